// Backward: one fused reduction pass (sum dy and sum dy * (x - mean) read x
// and dy once), then one elementwise pass for grad_input.
//
// The gradient sums cancel heavily (dy is close to zero-mean), so partial
// sums reach double lanes after a few float terms (at most 8), which
// keeps them at the final rounding on long channels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "channel_math.h"
#include "kernels.h"
#include "layout.h"
#include "resident_driver.h"
#include "step_drivers.h"
#include "vec_io.h"

namespace bnext::cpu {

namespace {

// The reduction's step: g = dy and t = x - mean (the fused ops' reduction
// with the identity), with the mean as its one coefficient.
template <typename scalar_t>
using ReduceCoefs =
    ChannelCoefs<typename VecIO<scalar_t>::acc_t, 1, VecIO<scalar_t>::kParts>;

// ahead > 0: each step also fetches the lines `ahead` elements on into L2.
template <typename scalar_t>
auto reduce_step(const scalar_t* dyp, const scalar_t* xp, int64_t ahead = 0) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  return [=](int64_t i, int64_t n, const typename ReduceCoefs<scalar_t>::Set& s, V* g, V* t)
             BNEXT_STEP {
    if (ahead > 0) {
      prefetch_l2(dyp + i, ahead);
      prefetch_l2(xp + i, ahead);
    }
    IO::load_n(dyp + i, g, n);
    IO::load_n(xp + i, t, n);
#pragma GCC unroll 4
    for (int j = 0; j < IO::kParts; ++j) t[j] = t[j] - s.v[0][j];
  };
}

template <typename scalar_t>
void backward_reduce_impl(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean_t,
    at::Tensor& sum_dy_out,
    at::Tensor& sum_dy_xmu_out) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const ChannelLayout L = make_layout(x);
  // The spread walk reads four rows a block apart at once: each step
  // fetches its line of the thread's next block, as the statistics tiles
  // do (stats.cpp).
  const int64_t ahead =
      spread_walk(L) ? spread_block_rows(L.C, sizeof(scalar_t)) * L.C : 0;
  reduce_steps<VecIO<scalar_t>>(
      L, ReduceCoefs<scalar_t>{{mean_t.const_data_ptr<acc_t>()}},
      reduce_step(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), ahead),
      sum_dy_out.mutable_data_ptr<double>(), sum_dy_xmu_out.mutable_data_ptr<double>());
}

// dx = dy * a + (x - mean) * b + k, or dx = dy * a when !use_x, with the
// coefficients (a) or (a, mean, b, k) in the acc dtype.
template <typename scalar_t, bool use_x>
using GradInputCoefs =
    ChannelCoefs<typename VecIO<scalar_t>::acc_t, use_x ? 4 : 1, VecIO<scalar_t>::kParts>;

template <typename scalar_t, bool use_x>
auto grad_input_step(const scalar_t* dyp, const scalar_t* xp, scalar_t* dxp) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  return [=](int64_t i, int64_t n, const typename GradInputCoefs<scalar_t, use_x>::Set& s,
             bool stream) BNEXT_STEP {
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
  };
}

template <typename scalar_t, bool use_x>
void backward_elementwise_impl(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean_t,
    const at::Tensor& a_t,
    const at::Tensor& b_t,
    const at::Tensor& k_t,
    at::Tensor& dx) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  GradInputCoefs<scalar_t, use_x> coefs{};
  coefs.p[0] = a_t.const_data_ptr<acc_t>();
  if constexpr (use_x) {
    coefs.p[1] = mean_t.const_data_ptr<acc_t>();
    coefs.p[2] = b_t.const_data_ptr<acc_t>();
    coefs.p[3] = k_t.const_data_ptr<acc_t>();
  }
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const ChannelLayout L = make_layout(dy);
  elementwise_steps<VecIO<scalar_t>::kStep>(
      L, coefs, StepOutput::of(L, dxp, use_x ? 3 : 2),
      grad_input_step<scalar_t, use_x>(
          dy.const_data_ptr<scalar_t>(), use_x ? x.const_data_ptr<scalar_t>() : nullptr, dxp));
}

// float32 training grad_input with double arithmetic per element:
// dx = dy * a + (x - mean) * b + k is a sum of terms that can be far larger
// than dx (small channels, var << eps, |mean| >> std); torch's CPU kernel
// evaluates it in double for float32 too, and float32 arithmetic would
// leave torch's accuracy.
// In double, (x - mean) * b + k = x * b + (k - mean * b) loses ~1e-16 of
// |mean * b|, far below float32 rounding of dx even at |mean| = 1e4 std, so
// the step takes three coefficients (a, b, k - mean * b), not four: at
// many channels_last channels the coefficient loads are most of a step.
// Memory traffic is unchanged.
using GradInputF32Coefs = ChannelCoefs<double, 3, ToDouble<float>::kParts>;

inline double fold_mean(double k, double mean, double b) {
  return k - mean * b;
}

inline auto grad_input_f32_exact_step(const float* dyp, const float* xp, float* dxp) {
  using IO = VecIO<float>;
  using V = Vectorized<float>;
  using D = Vectorized<double>;
  using Widen = ToDouble<float>;
  return [=](int64_t i, int64_t n, const GradInputF32Coefs::Set& s, bool stream) BNEXT_STEP {
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
  };
}

// mean, a, b, k are (C,) float64.
void backward_elementwise_f32_exact(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean_t,
    const at::Tensor& a_t,
    const at::Tensor& b_t,
    const at::Tensor& k_t,
    at::Tensor& dx) {
  const int64_t C = mean_t.numel();
  std::vector<double> k_folded(static_cast<size_t>(C));
  {
    const double* m = mean_t.const_data_ptr<double>();
    const double* b = b_t.const_data_ptr<double>();
    const double* k = k_t.const_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) k_folded[c] = fold_mean(k[c], m[c], b[c]);
  }
  float* dxp = dx.mutable_data_ptr<float>();
  const GradInputF32Coefs coefs{{a_t.const_data_ptr<double>(), b_t.const_data_ptr<double>(),
                                 k_folded.data()}};
  const ChannelLayout L = make_layout(dy);
  elementwise_steps<VecIO<float>::kStep>(
      L, coefs, StepOutput::of(L, dxp, 3),
      grad_input_f32_exact_step(dy.const_data_ptr<float>(), x.const_data_ptr<float>(), dxp));
}

// Training grad_input and the sums with the resident walk
// (resident_driver.h), or false where it does not apply. Each channel's
// coefficients come from channel_backward, as backward_coeffs computes
// them, as soon as its sums are complete. float32 gets the exact step.
template <typename scalar_t>
bool backward_resident_impl(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean_t,
    const at::Tensor& mean_hi_t,
    const at::Tensor& invstd_t,
    const at::Tensor& w_t,
    at::Tensor& sum_dy_out,
    at::Tensor& sum_dy_xmu_out,
    at::Tensor& dx) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  constexpr bool exact = std::is_same_v<scalar_t, float>;
  using coef_t = std::conditional_t<exact, double, acc_t>;
  const ChannelLayout L = make_layout(x);
  const int64_t block = resident_block_channels(L, sizeof(scalar_t), 2);
  if (block == 0) {
    return false;
  }
  const int64_t C = L.C;
  const double inv_n = 1.0 / static_cast<double>(L.N * L.S);
  const double* m = mean_t.const_data_ptr<double>();
  const acc_t* mh = mean_hi_t.const_data_ptr<acc_t>();
  const acc_t* is = invstd_t.const_data_ptr<acc_t>();
  const acc_t* w = w_t.const_data_ptr<acc_t>();
  double* sdy = sum_dy_out.mutable_data_ptr<double>();
  double* sxm = sum_dy_xmu_out.mutable_data_ptr<double>();
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  // a, b, k (exact: k - mean * b) per channel.
  std::vector<coef_t> coef(static_cast<size_t>(3 * C));
  coef_t* pa = coef.data();
  coef_t* pb = pa + C;
  coef_t* pk = pb + C;
  auto channel = [&](int64_t c, double s, double sx) {
    sdy[c] = s;
    sxm[c] = sx;
    const double km = exact ? m[c] : static_cast<double>(mh[c]);
    const ChannelBackward r = channel_backward(m[c], mh[c], km, is[c], w[c], s, sx, inv_n, true);
    pa[c] = static_cast<coef_t>(r.a);
    pb[c] = static_cast<coef_t>(r.b);
    pk[c] = static_cast<coef_t>(exact ? fold_mean(r.k, m[c], r.b) : r.k);
  };
  const ReduceCoefs<scalar_t> rcoefs{{mh}};
  const auto rstep = reduce_step(dyp, xp);
  auto reduce_block = [&](int64_t c0, int64_t c1) {
    double s[kResidentMaxChannels], sx[kResidentMaxChannels];
    block_pair_sums<VecIO<scalar_t>>(L, rcoefs, rstep, c0, c1, s, sx);
    for (int64_t c = c0; c < c1; ++c) channel(c, s[c - c0], sx[c - c0]);
  };
  const StepOutput out = StepOutput::of(L, dxp, 3);
  constexpr int64_t K = VecIO<scalar_t>::kStep;
  if constexpr (exact) {
    resident_channel_blocks<K>(
        L, block, reduce_block, GradInputF32Coefs{{pa, pb, pk}}, out,
        grad_input_f32_exact_step(dyp, xp, dxp));
  } else {
    resident_channel_blocks<K>(
        L, block, reduce_block, GradInputCoefs<scalar_t, true>{{pa, mh, pb, pk}}, out,
        grad_input_step<scalar_t, true>(dyp, xp, dxp));
  }
  return true;
}

}  // namespace

void backward_reduce(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean,
    at::Tensor& sum_dy,
    at::Tensor& sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_backward_reduce", [&] {
        backward_reduce_impl<scalar_t>(dy, x, mean, sum_dy, sum_dy_xmu);
      });
}

bool backward_resident(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& mean_hi,
    const at::Tensor& invstd,
    const at::Tensor& w,
    at::Tensor& sum_dy,
    at::Tensor& sum_dy_xmu,
    at::Tensor& dx) {
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_backward_resident", [&] {
        done = backward_resident_impl<scalar_t>(
            dy, x, mean, mean_hi, invstd, w, sum_dy, sum_dy_xmu, dx);
      });
  return done;
}

void backward_elementwise(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& a,
    const at::Tensor& bx,
    const at::Tensor& k,
    bool use_x,
    at::Tensor& dx) {
  if (use_x && dy.scalar_type() == at::kFloat && a.scalar_type() == at::kDouble) {
    backward_elementwise_f32_exact(dy, x, mean, a, bx, k, dx);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dy.scalar_type(), "bnext_backward_elementwise",
      [&] {
        if (use_x) {
          backward_elementwise_impl<scalar_t, true>(dy, x, mean, a, bx, k, dx);
        } else {
          backward_elementwise_impl<scalar_t, false>(dy, x, mean, a, bx, k, dx);
        }
      });
}

}  // namespace bnext::cpu
