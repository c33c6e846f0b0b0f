// The fused ops' backward passes as templates, shared by the translation
// units that instantiate them (fused_backward_reduce*.cpp,
// fused_backward_resident.cpp, fused_backward_elementwise.cpp): one file of
// every instantiation was the build's longest compile by far.
//
// Backward of the fused ops: act'(z) is recomputed from the saved input
// (or taken from the saved output, memory_saving), so neither the
// pre-activation nor a mask is ever stored. Two passes, like plain batch
// norm: the sums, then grad_input (for large NCHW inputs in one resident
// walk, as plain batch norm's).
#pragma once
#include <ATen/Dispatch.h>

#include <vector>

#include "channel_math.h"
#include "fused_kernels.h"
#include "resident_driver.h"
#include "step_drivers.h"

namespace bnext::cpu::act_backward_detail {

// Rebuilds g = dy * act'(z) and t for one step.
template <typename scalar_t, Act A, bool kSavedIsOutput, bool kResidual>
struct GradTerms {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  using Fn = ActFn<A, acc_t>;
  static constexpr int P = IO::kParts;
  static constexpr bool kRes = kResidual;
  // From the input: m_hi, alpha, beta. From the output: bias.
  using Coefs = ChannelCoefs<acc_t, kSavedIsOutput ? 1 : 3, P>;
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
    if constexpr (kSavedIsOutput) {
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
    if constexpr (kSavedIsOutput) {
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
    if constexpr (kSavedIsOutput) {
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

// Pass 1's step: g and t, with g stored as grad_residual when there is a
// residual.
template <typename Terms>
auto reduce_step(const Terms& terms, at::Tensor& grad_residual) {
  using IO = typename Terms::IO;
  using V = typename Terms::V;
  using scalar_t = typename IO::scalar_type;
  constexpr bool kRes = Terms::kRes;
  scalar_t* gp = kRes ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
  return [=](int64_t i, int64_t n, const typename Terms::Set& s, V* g, V* t) BNEXT_STEP {
    terms.both(i, n, s, g, t);
    if constexpr (kRes) IO::store_n(gp + i, g, n);
  };
}

template <typename scalar_t, Act A, bool kSavedIsOutput, bool kRes>
void reduce_impl(
    const at::Tensor& dy,
    const GradSource& src,
    at::Tensor& grad_residual,
    at::Tensor& sum_g,
    at::Tensor& sum_gt) {
  using Terms = GradTerms<scalar_t, A, kSavedIsOutput, kRes>;
  using IO = typename Terms::IO;
  using V = typename Terms::V;
  const Terms terms(dy, src);
  reduce_steps<IO>(
      make_layout(src.saved), terms.coefs, reduce_step(terms, grad_residual),
      sum_g.mutable_data_ptr<double>(), sum_gt.mutable_data_ptr<double>());
}

// Pass 2's coefficients (the step's own, and the float64 A, B, K) and step:
// dx = g * A + t * B + K.
template <typename Terms>
using ElementwiseCoefs = CoefPair<
    typename Terms::Coefs,
    ChannelCoefs<double, 3, Terms::P * ToDouble<typename Terms::acc_t>::kParts>>;

template <typename Terms>
auto elementwise_step(const Terms& terms, const at::Tensor& grad_residual, at::Tensor& dx) {
  using IO = typename Terms::IO;
  using acc_t = typename Terms::acc_t;
  using V = typename Terms::V;
  using scalar_t = typename IO::scalar_type;
  using D = Vectorized<double>;
  using Widen = ToDouble<acc_t>;
  constexpr int P = IO::kParts;
  constexpr int WP = Widen::kParts;
  constexpr bool kRes = Terms::kRes;
  const scalar_t* gp =
      kRes && IO::kParts == 1 ? grad_residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  return [=](int64_t i, int64_t n, const typename ElementwiseCoefs<Terms>::Set& s, bool stream)
             BNEXT_STEP {
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
  };
}

template <typename scalar_t, Act A, bool kSavedIsOutput, bool kRes>
void elementwise_impl(
    const at::Tensor& dy,
    const GradSource& src,
    const at::Tensor& grad_residual,
    const at::Tensor& A_t,
    const at::Tensor& B_t,
    const at::Tensor& K_t,
    at::Tensor& dx) {
  using Terms = GradTerms<scalar_t, A, kSavedIsOutput, kRes>;
  using Coefs = ElementwiseCoefs<Terms>;
  const Terms terms(dy, src);
  const Coefs coefs{terms.coefs,
                    {{A_t.const_data_ptr<double>(), B_t.const_data_ptr<double>(),
                      K_t.const_data_ptr<double>()}}};
  const ChannelLayout L = make_layout(src.saved);
  elementwise_steps<Terms::IO::kStep>(
      L, coefs, StepOutput::of(L, dx.const_data_ptr<scalar_t>(), kRes ? 4 : 3),
      elementwise_step(terms, grad_residual, dx));
}

// Training pass 1 and grad_input in the resident walk (resident_driver.h),
// or false where it does not apply. Per channel, as the two-pass path
// computes them: sum g * t scaled by x_per_t (from the output), then
// channel_backward, with B scaled by x_per_t.
template <typename scalar_t, Act A, bool kSavedIsOutput, bool kRes>
bool resident_impl(
    const at::Tensor& dy,
    const GradSource& src,
    const ActBackwardStats& st,
    at::Tensor& grad_residual,
    at::Tensor& sum_g,
    at::Tensor& sum_gt,
    at::Tensor& dx) {
  using Terms = GradTerms<scalar_t, A, kSavedIsOutput, kRes>;
  using IO = typename Terms::IO;
  using acc_t = typename Terms::acc_t;
  const ChannelLayout L = make_layout(src.saved);
  const int reads = kRes ? 3 : 2;  // dy, the saved tensor, the residual
  // float32/float64 only: half types recompute g in pass 2, which costs
  // what the resident walk saves.
  const int64_t block = IO::kParts == 1 ? resident_block_channels(L, sizeof(scalar_t), reads) : 0;
  if (block == 0) {
    return false;
  }
  const int64_t C = L.C;
  const double inv_n = 1.0 / static_cast<double>(L.N * L.S);
  const double* m = st.mean.const_data_ptr<double>();
  const acc_t* is = st.invstd.const_data_ptr<acc_t>();
  const acc_t* w = st.w.const_data_ptr<acc_t>();
  const double* xpt = kSavedIsOutput ? st.x_per_t.const_data_ptr<double>() : nullptr;
  const acc_t* mh = kSavedIsOutput ? nullptr : src.mean_hi.const_data_ptr<acc_t>();
  double* psg = sum_g.mutable_data_ptr<double>();
  double* psgt = sum_gt.mutable_data_ptr<double>();
  std::vector<double> coef(static_cast<size_t>(3 * C));
  double* pa = coef.data();
  double* pb = pa + C;
  double* pk = pb + C;
  const Terms terms(dy, src);
  const auto rstep = reduce_step(terms, grad_residual);
  auto reduce_block = [&](int64_t c0, int64_t c1) {
    double s[kResidentMaxChannels], sx[kResidentMaxChannels];
    block_pair_sums<IO>(L, terms.coefs, rstep, c0, c1, s, sx);
    for (int64_t c = c0; c < c1; ++c) {
      const double sgt = kSavedIsOutput ? sx[c - c0] * xpt[c] : sx[c - c0];
      psg[c] = s[c - c0];
      psgt[c] = sgt;
      const double centre = kSavedIsOutput ? m[c] : static_cast<double>(mh[c]);
      const ChannelBackward r =
          channel_backward(m[c], centre, centre, is[c], w[c], s[c - c0], sgt, inv_n, true);
      pa[c] = r.a;
      pb[c] = kSavedIsOutput ? r.b * xpt[c] : r.b;
      pk[c] = r.k;
    }
  };
  const ElementwiseCoefs<Terms> coefs{terms.coefs, {{pa, pb, pk}}};
  resident_channel_blocks<IO::kStep>(
      L, block, reduce_block, coefs,
      StepOutput::of(L, dx.const_data_ptr<scalar_t>(), kRes ? 4 : 3),
      elementwise_step(terms, grad_residual, dx));
  return true;
}

// Calls fn.template operator()<scalar_t, A, kSavedIsOutput, kRes>() for the
// runtime dtype and source, with or without a residual as kRes says;
// memory_saving instantiates the invertible activations only.
template <bool kRes, typename Fn>
void dispatch_source_for(const at::Tensor& dy, const GradSource& src, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dy.scalar_type(), "bnext_act_backward", [&] {
        if (src.saved_is_output) {
          dispatch_invertible_act(src.spec.act, [&](auto a) {
            fn.template operator()<scalar_t, decltype(a)::value, true, kRes>();
          });
        } else {
          dispatch_act(src.spec.act, [&](auto a) {
            fn.template operator()<scalar_t, decltype(a)::value, false, kRes>();
          });
        }
      });
}

// The same for the runtime residual.
template <typename Fn>
void dispatch_source(const at::Tensor& dy, const GradSource& src, Fn&& fn) {
  if (src.residual.defined()) {
    dispatch_source_for<true>(dy, src, fn);
  } else {
    dispatch_source_for<false>(dy, src, fn);
  }
}

// act_backward_reduce with a residual: a translation unit of its own
// (fused_backward_reduce_residual.cpp), the sums being the costliest
// templates to compile.
void act_backward_reduce_residual(
    const at::Tensor& dy,
    const GradSource& src,
    at::Tensor& grad_residual,
    at::Tensor& sum_g,
    at::Tensor& sum_gt);

}  // namespace bnext::cpu::act_backward_detail
