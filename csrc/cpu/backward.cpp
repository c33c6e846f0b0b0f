// Backward: one fused reduction pass (sum dy and sum dy * (x - mean) read x
// and dy once), then one elementwise pass for grad_input.
//
// The gradient sums cancel heavily (dy is close to zero-mean), so partial
// sums reach double lanes after a few float terms: float32 lanes flushed
// every 64 terms measured ~3x the float32 tolerance at 4e4 elements per
// channel; flushed every 8 terms they stay at the final rounding.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "layout.h"
#include "step_drivers.h"
#include "vec_io.h"

namespace bnext::cpu {

namespace {

template <typename scalar_t>
void backward_reduce_impl(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean_t,
    at::Tensor& sum_dy_out,
    at::Tensor& sum_dy_xmu_out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  using Coefs = ChannelCoefs<acc_t, 1, IO::kParts>;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  // The fused ops' reduction with g = dy and t = x - mean.
  reduce_steps<IO>(
      make_layout(x), Coefs{{mean_t.const_data_ptr<acc_t>()}},
      [=](int64_t i, int64_t n, const typename Coefs::Set& s, V* g, V* t) BNEXT_STEP {
        IO::load_n(dyp + i, g, n);
        IO::load_n(xp + i, t, n);
#pragma GCC unroll 4
        for (int j = 0; j < IO::kParts; ++j) t[j] = t[j] - s.v[0][j];
      },
      sum_dy_out.mutable_data_ptr<double>(), sum_dy_xmu_out.mutable_data_ptr<double>());
}

// dx = dy * a + (x - mean) * b + k, or dx = dy * a when !use_x.
template <typename scalar_t, bool use_x>
void backward_elementwise_impl(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean_t,
    const at::Tensor& a_t,
    const at::Tensor& b_t,
    const at::Tensor& k_t,
    at::Tensor& dx) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  constexpr int64_t K = IO::kStep;
  constexpr int64_t W = V::size();

  const ChannelLayout L = make_layout(dy);
  const int64_t C = L.C;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = use_x ? x.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const acc_t* mean = use_x ? mean_t.const_data_ptr<acc_t>() : nullptr;
  const acc_t* a = a_t.const_data_ptr<acc_t>();
  const acc_t* b = use_x ? b_t.const_data_ptr<acc_t>() : nullptr;
  const acc_t* k = use_x ? k_t.const_data_ptr<acc_t>() : nullptr;

  auto scalar = [&](const scalar_t* g, const scalar_t* xi, int64_t i, int64_t c) {
    acc_t v = static_cast<acc_t>(g[i]) * a[c];
    if constexpr (use_x) {
      v += (static_cast<acc_t>(xi[i]) - mean[c]) * b[c] + k[c];
    }
    return static_cast<scalar_t>(v);
  };

  parallel_elementwise(
      L,
      [&](int64_t c, int64_t offset, int64_t len) {
        const scalar_t* g = dyp + offset;
        const scalar_t* xi = use_x ? xp + offset : nullptr;
        scalar_t* out = dxp + offset;
        const V va(a[c]);
        const V vm(use_x ? mean[c] : acc_t(0));
        const V vb(use_x ? b[c] : acc_t(0));
        const V vk(use_x ? k[c] : acc_t(0));
        int64_t i = 0;
        for (; i + K <= len; i += K) {
          V gv[P];
          IO::load(g + i, gv);
          if constexpr (use_x) {
            V xv[P];
            IO::load(xi + i, xv);
            #pragma GCC unroll 16
            for (int j = 0; j < P; ++j) {
              gv[j] = at::vec::fmadd(gv[j], va, at::vec::fmadd(xv[j] - vm, vb, vk));
            }
          } else {
            #pragma GCC unroll 16
            for (int j = 0; j < P; ++j) gv[j] = gv[j] * va;
          }
          IO::store(out + i, gv);
        }
        for (; i < len; ++i) out[i] = scalar(g, xi, i, c);
      },
      [&](int64_t offset, int64_t nrows) {
        // Locals, not closure members: stores through `out` would otherwise
        // force a reload of every captured pointer per vector.
        const acc_t* const a_l = a;
        const acc_t* const b_l = b;
        const acc_t* const k_l = k;
        const acc_t* const mean_l = mean;
        const int64_t C_l = C;
        for (int64_t r = 0; r < nrows; ++r) {
          const scalar_t* g = dyp + offset + r * C_l;
          const scalar_t* xi = use_x ? xp + offset + r * C_l : nullptr;
          scalar_t* out = dxp + offset + r * C_l;
          int64_t c = 0;
          for (; c + K <= C_l; c += K) {
            V gv[P];
            IO::load(g + c, gv);
            if constexpr (use_x) {
              V xv[P];
              IO::load(xi + c, xv);
              #pragma GCC unroll 16
              for (int j = 0; j < P; ++j) {
                const int64_t cj = c + j * W;
                gv[j] = at::vec::fmadd(
                    gv[j], V::loadu(a_l + cj),
                    at::vec::fmadd(xv[j] - V::loadu(mean_l + cj), V::loadu(b_l + cj), V::loadu(k_l + cj)));
              }
            } else {
              #pragma GCC unroll 16
              for (int j = 0; j < P; ++j) gv[j] = gv[j] * V::loadu(a_l + c + j * W);
            }
            IO::store(out + c, gv);
          }
          for (; c < C_l; ++c) out[c] = scalar(g, xi, c, c);
        }
      });
}

// float32 training grad_input with double arithmetic per element:
// dx = dy * a + (x - mean) * b + k is a sum of terms that can be far larger
// than dx (small channels, var << eps, |mean| >> std); torch's CPU kernel
// evaluates it in double for float32 too, and float32 arithmetic was
// measured at up to 1.2x the float32 tolerance where torch stays within it.
// mean, a, b, k are (C,) float64. Memory traffic is unchanged.
void backward_elementwise_f32_exact(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean_t,
    const at::Tensor& a_t,
    const at::Tensor& b_t,
    const at::Tensor& k_t,
    at::Tensor& dx) {
  using V = Vectorized<float>;
  using D = Vectorized<double>;
  using Widen = ToDouble<float>;
  constexpr int64_t W = V::size();
  constexpr int64_t WD = D::size();
  const ChannelLayout L = make_layout(dy);
  const int64_t C = L.C;
  const float* dyp = dy.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  float* dxp = dx.mutable_data_ptr<float>();
  const double* mean = mean_t.const_data_ptr<double>();
  const double* a = a_t.const_data_ptr<double>();
  const double* b = b_t.const_data_ptr<double>();
  const double* k = k_t.const_data_ptr<double>();

  // One float vector from dy and x with per-lane double coefficients.
  auto step = [](const V& g, const V& xv, const D* m, const D* av, const D* bv, const D* kv) {
    D gd[2], xd[2];
    Widen::apply(g, gd);
    Widen::apply(xv, xd);
    const D r0 = at::vec::fmadd(gd[0], av[0], at::vec::fmadd(xd[0] - m[0], bv[0], kv[0]));
    const D r1 = at::vec::fmadd(gd[1], av[1], at::vec::fmadd(xd[1] - m[1], bv[1], kv[1]));
    return to_float(r0, r1);
  };

  parallel_elementwise(
      L,
      [&](int64_t c, int64_t offset, int64_t len) {
        const D m[2] = {D(mean[c]), D(mean[c])};
        const D av[2] = {D(a[c]), D(a[c])};
        const D bv[2] = {D(b[c]), D(b[c])};
        const D kv[2] = {D(k[c]), D(k[c])};
        const float* g = dyp + offset;
        const float* xi = xp + offset;
        float* out = dxp + offset;
        int64_t i = 0;
        for (; i + W <= len; i += W) {
          step(V::loadu(g + i), V::loadu(xi + i), m, av, bv, kv).store(out + i);
        }
        for (; i < len; ++i) {
          out[i] = static_cast<float>(
              g[i] * a[c] + (static_cast<double>(xi[i]) - mean[c]) * b[c] + k[c]);
        }
      },
      [&](int64_t offset, int64_t nrows) {
        const double* const mean_l = mean;
        const double* const a_l = a;
        const double* const b_l = b;
        const double* const k_l = k;
        const int64_t C_l = C;
        for (int64_t r = 0; r < nrows; ++r) {
          const float* g = dyp + offset + r * C_l;
          const float* xi = xp + offset + r * C_l;
          float* out = dxp + offset + r * C_l;
          int64_t c = 0;
          for (; c + W <= C_l; c += W) {
            const D m[2] = {D::loadu(mean_l + c), D::loadu(mean_l + c + WD)};
            const D av[2] = {D::loadu(a_l + c), D::loadu(a_l + c + WD)};
            const D bv[2] = {D::loadu(b_l + c), D::loadu(b_l + c + WD)};
            const D kv[2] = {D::loadu(k_l + c), D::loadu(k_l + c + WD)};
            step(V::loadu(g + c), V::loadu(xi + c), m, av, bv, kv).store(out + c);
          }
          for (; c < C_l; ++c) {
            out[c] = static_cast<float>(
                g[c] * a_l[c] + (static_cast<double>(xi[c]) - mean_l[c]) * b_l[c] + k_l[c]);
          }
        }
      });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> backward_reduce(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean) {
  const auto opts = x.options().dtype(at::kDouble);
  const int64_t C = x.size(1);
  at::Tensor sum_dy = at::empty({C}, opts);
  at::Tensor sum_dy_xmu = at::empty({C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_backward_reduce", [&] {
        backward_reduce_impl<scalar_t>(dy, x, mean, sum_dy, sum_dy_xmu);
      });
  return {sum_dy, sum_dy_xmu};
}

void backward_elementwise(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& a,
    const at::Tensor& b,
    const at::Tensor& c,
    bool use_x,
    at::Tensor& dx) {
  if (use_x && dy.scalar_type() == at::kFloat && a.scalar_type() == at::kDouble) {
    backward_elementwise_f32_exact(dy, x, mean, a, b, c, dx);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dy.scalar_type(), "bnext_backward_elementwise",
      [&] {
        if (use_x) {
          backward_elementwise_impl<scalar_t, true>(dy, x, mean, a, b, c, dx);
        } else {
          backward_elementwise_impl<scalar_t, false>(dy, x, mean, a, b, c, dx);
        }
      });
}

}  // namespace bnext::cpu
