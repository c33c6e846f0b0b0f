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
  using Coefs = ChannelCoefs<acc_t, use_x ? 4 : 1, P>;

  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = use_x ? x.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  Coefs coefs{};
  coefs.p[0] = a_t.const_data_ptr<acc_t>();
  if constexpr (use_x) {
    coefs.p[1] = mean_t.const_data_ptr<acc_t>();
    coefs.p[2] = b_t.const_data_ptr<acc_t>();
    coefs.p[3] = k_t.const_data_ptr<acc_t>();
  }
  const ChannelLayout L = make_layout(dy);
  elementwise_steps<IO::kStep>(
      L, coefs, StepOutput::of(L, dxp, use_x ? 3 : 2),
      [=](int64_t i, int64_t n, const typename Coefs::Set& s, bool stream) BNEXT_STEP {
        V g[P];
        IO::load_n(dyp + i, g, n);
        if constexpr (use_x) {
          V xv[P];
          IO::load_n(xp + i, xv, n);
#pragma GCC unroll 4
          for (int j = 0; j < P; ++j) {
            g[j] = at::vec::fmadd(
                g[j], s.v[0][j], at::vec::fmadd(xv[j] - s.v[1][j], s.v[2][j], s.v[3][j]));
          }
        } else {
#pragma GCC unroll 4
          for (int j = 0; j < P; ++j) g[j] = g[j] * s.v[0][j];
        }
        IO::store_n(dxp + i, g, n, stream);
      });
}

// float32 training grad_input with double arithmetic per element:
// dx = dy * a + (x - mean) * b + k is a sum of terms that can be far larger
// than dx (small channels, var << eps, |mean| >> std); torch's CPU kernel
// evaluates it in double for float32 too, and float32 arithmetic was
// measured at up to 1.2x the float32 tolerance where torch stays within it.
// In double, (x - mean) * b + k = x * b + (k - mean * b) loses ~1e-16 of
// |mean * b|, far below float32 rounding of dx even at |mean| = 1e4 std, so
// the kernel takes three coefficients (a, b, k - mean * b), not four: at
// many channels_last channels the coefficient loads are most of a step.
// mean, a, b, k are (C,) float64. Memory traffic is unchanged.
void backward_elementwise_f32_exact(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean_t,
    const at::Tensor& a_t,
    const at::Tensor& b_t,
    const at::Tensor& k_t,
    at::Tensor& dx) {
  using IO = VecIO<float>;
  using V = Vectorized<float>;
  using D = Vectorized<double>;
  using Widen = ToDouble<float>;
  using Coefs = ChannelCoefs<double, 3, Widen::kParts>;  // a, b, k - mean * b
  const int64_t C = mean_t.numel();
  std::vector<double> k_folded(static_cast<size_t>(C));
  {
    const double* m = mean_t.const_data_ptr<double>();
    const double* b = b_t.const_data_ptr<double>();
    const double* k = k_t.const_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) k_folded[c] = k[c] - m[c] * b[c];
  }
  const float* dyp = dy.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  float* dxp = dx.mutable_data_ptr<float>();
  const Coefs coefs{{a_t.const_data_ptr<double>(), b_t.const_data_ptr<double>(),
                     k_folded.data()}};
  const ChannelLayout L = make_layout(dy);
  elementwise_steps<IO::kStep>(
      L, coefs, StepOutput::of(L, dxp, 3),
      [=](int64_t i, int64_t n, const typename Coefs::Set& s, bool stream) BNEXT_STEP {
        V g, xv;
        IO::load_n(dyp + i, &g, n);
        IO::load_n(xp + i, &xv, n);
        D gd[2], xd[2], r[2];
        Widen::apply(g, gd);
        Widen::apply(xv, xd);
#pragma GCC unroll 2
        for (int q = 0; q < 2; ++q) {
          r[q] = at::vec::fmadd(gd[q], s.v[0][q], at::vec::fmadd(xd[q], s.v[1][q], s.v[2][q]));
        }
        g = to_float(r[0], r[1]);
        IO::store_n(dxp + i, &g, n, stream);
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
