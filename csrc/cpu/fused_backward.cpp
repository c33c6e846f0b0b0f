// Backward of the fused ops: act'(z) is recomputed from the saved input
// (or taken from the saved output, memory_saving), so neither the
// pre-activation nor a mask is ever stored. Two passes, like plain batch
// norm: the sums, then grad_input.
#include <ATen/Dispatch.h>

#include "fused_kernels.h"
#include "step_drivers.h"

namespace bnext::cpu {

namespace {

// Rebuilds g = dy * act'(z) and t for one step.
template <typename scalar_t, Act A, bool kFromOutput, bool kRes>
struct GradTerms {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  using Fn = ActFn<A, acc_t>;
  static constexpr int P = IO::kParts;
  // From the input: m_hi, alpha, beta. From the output: bias.
  using Coefs = ChannelCoefs<acc_t, kFromOutput ? 1 : 3, P>;
  using Set = typename Coefs::Set;

  const scalar_t* dyp;
  const scalar_t* sp;
  const scalar_t* rp;
  V slope;
  Coefs coefs;

  GradTerms(const at::Tensor& dy, const GradSource& src)
      : dyp(dy.const_data_ptr<scalar_t>()),
        sp(src.saved.const_data_ptr<scalar_t>()),
        rp(kRes ? src.residual.const_data_ptr<scalar_t>() : nullptr),
        slope(static_cast<acc_t>(src.spec.negative_slope)) {
    if constexpr (kFromOutput) {
      coefs = Coefs{{src.beta.const_data_ptr<acc_t>()}};
    } else {
      coefs = Coefs{{src.mean_hi.const_data_ptr<acc_t>(), src.alpha.const_data_ptr<acc_t>(),
                     src.beta.const_data_ptr<acc_t>()}};
    }
  }

  // From the output, t = act^-1(y) - r - bias.
  BNEXT_STEP void centred_from_output(const V* y, const V* r, const Set& s, V* t) const {
#pragma GCC unroll 4
    for (int j = 0; j < P; ++j) {
      V u = Fn::inverse(y[j], slope);
      if constexpr (kRes) u = u - r[j];
      t[j] = u - s.v[0][j];
    }
  }

  BNEXT_STEP void t_only(int64_t i, int64_t n, const Set& s, V* t) const {
    V sv[P], r[P];
    IO::load_n(sp + i, sv, n);
    if constexpr (kFromOutput) {
      if constexpr (kRes) IO::load_n(rp + i, r, n);
      centred_from_output(sv, r, s, t);
    } else {
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) t[j] = sv[j] - s.v[0][j];
    }
  }

  BNEXT_STEP void both(int64_t i, int64_t n, const Set& s, V* g, V* t) const {
    V d[P], sv[P], r[P];
    IO::load_n(dyp + i, d, n);
    IO::load_n(sp + i, sv, n);
    if constexpr (kRes) IO::load_n(rp + i, r, n);
    if constexpr (kFromOutput) {
      centred_from_output(sv, r, s, t);
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) g[j] = Fn::vjp_at_output(d[j], sv[j], slope);
    } else {
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) {
        t[j] = sv[j] - s.v[0][j];
        V z = at::vec::fmadd(t[j], s.v[1][j], s.v[2][j]);  // as in the forward
        if constexpr (kRes) z = z + r[j];
        g[j] = Fn::vjp(d[j], z, slope);
      }
    }
  }
};

template <typename scalar_t, Act A, bool kFromOutput, bool kRes>
void reduce_impl(
    const at::Tensor& dy,
    const GradSource& src,
    at::Tensor& grad_residual,
    at::Tensor& sum_g,
    at::Tensor& sum_gt) {
  using Terms = GradTerms<scalar_t, A, kFromOutput, kRes>;
  using IO = typename Terms::IO;
  using V = typename Terms::V;
  const Terms terms(dy, src);
  scalar_t* gp = kRes ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
  reduce_steps<IO>(
      make_layout(src.saved), terms.coefs,
      [=](int64_t i, int64_t n, const typename Terms::Set& s, V* g, V* t) BNEXT_STEP {
        terms.both(i, n, s, g, t);
        if constexpr (kRes) IO::store_n(gp + i, g, n);
      },
      sum_g.mutable_data_ptr<double>(), sum_gt.mutable_data_ptr<double>());
}

template <typename scalar_t, Act A, bool kFromOutput, bool kRes>
void elementwise_impl(
    const at::Tensor& dy,
    const GradSource& src,
    const at::Tensor& grad_residual,
    const at::Tensor& A_t,
    const at::Tensor& B_t,
    const at::Tensor& K_t,
    at::Tensor& dx) {
  using Terms = GradTerms<scalar_t, A, kFromOutput, kRes>;
  using IO = typename Terms::IO;
  using acc_t = typename Terms::acc_t;
  using V = typename Terms::V;
  using D = Vectorized<double>;
  using Widen = ToDouble<acc_t>;
  constexpr int P = IO::kParts;
  constexpr int WP = Widen::kParts;
  using DCoefs = ChannelCoefs<double, 3, P * WP>;
  using Coefs = CoefPair<typename Terms::Coefs, DCoefs>;

  const Terms terms(dy, src);
  const scalar_t* gp =
      kRes && IO::kParts == 1 ? grad_residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const Coefs coefs{terms.coefs,
                    DCoefs{{A_t.const_data_ptr<double>(), B_t.const_data_ptr<double>(),
                            K_t.const_data_ptr<double>()}}};

  const ChannelLayout L = make_layout(src.saved);
  elementwise_steps<IO::kStep>(
      L, coefs, StepOutput::of(L, dxp, kRes ? 4 : 3),
      [=](int64_t i, int64_t n, const typename Coefs::Set& s, bool stream) BNEXT_STEP {
        V g[P], t[P];
        // g in grad_residual is exact for float/double; half types recompute
        // it, since the sums saw it unrounded.
        if constexpr (kRes && IO::kParts == 1) {
          IO::load_n(gp + i, g, n);
          terms.t_only(i, n, s.a, t);
        } else {
          terms.both(i, n, s.a, g, t);
        }
        // Double per element, as torch's CPU batch-norm backward does: the
        // three terms can be far larger than their sum.
#pragma GCC unroll 4
        for (int j = 0; j < P; ++j) {
          D gd[WP], td[WP], r[WP];
          Widen::apply(g[j], gd);
          Widen::apply(t[j], td);
#pragma GCC unroll 4
          for (int q = 0; q < WP; ++q) {
            const int k = j * WP + q;
            r[q] = at::vec::fmadd(gd[q], s.b.v[0][k], at::vec::fmadd(td[q], s.b.v[1][k], s.b.v[2][k]));
          }
          if constexpr (WP == 1) {
            g[j] = r[0];
          } else {
            g[j] = to_float(r[0], r[1]);
          }
        }
        IO::store_n(dxp + i, g, n, stream);
      });
}

// Calls fn.template operator()<scalar_t, A, kFromOutput, kRes>() for the
// runtime source; memory_saving instantiates the invertible activations only.
template <typename Fn>
void dispatch_source(const at::Tensor& dy, const GradSource& src, Fn&& fn) {
  const bool res = src.residual.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dy.scalar_type(), "bnext_act_backward", [&] {
        if (src.from_output) {
          dispatch_invertible_act(src.spec.act, [&](auto a) {
            if (res) {
              fn.template operator()<scalar_t, decltype(a)::value, true, true>();
            } else {
              fn.template operator()<scalar_t, decltype(a)::value, true, false>();
            }
          });
        } else {
          dispatch_act(src.spec.act, [&](auto a) {
            if (res) {
              fn.template operator()<scalar_t, decltype(a)::value, false, true>();
            } else {
              fn.template operator()<scalar_t, decltype(a)::value, false, false>();
            }
          });
        }
      });
}

}  // namespace

void act_backward_reduce(
    const at::Tensor& dy,
    const GradSource& src,
    at::Tensor& grad_residual,
    at::Tensor& sum_g,
    at::Tensor& sum_gt) {
  dispatch_source(dy, src, [&]<typename scalar_t, Act A, bool kOut, bool kRes>() {
    reduce_impl<scalar_t, A, kOut, kRes>(dy, src, grad_residual, sum_g, sum_gt);
  });
}

void act_backward_elementwise(
    const at::Tensor& dy,
    const GradSource& src,
    const at::Tensor& grad_residual,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& K,
    at::Tensor& dx) {
  dispatch_source(dy, src, [&]<typename scalar_t, Act Ac, bool kOut, bool kRes>() {
    elementwise_impl<scalar_t, Ac, kOut, kRes>(dy, src, grad_residual, A, B, K, dx);
  });
}

}  // namespace bnext::cpu
