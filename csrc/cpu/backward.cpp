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
#include <cstdlib>
#include <vector>

#include "../checks.h"
#include "cache_policy.h"
#include "channel_math.h"
#include "kernels.h"
#include "layout.h"
#include "step_drivers.h"
#include "vec_io.h"

namespace bnext::cpu {

namespace {

// Reduction step: g = dy, t = x - mean (one acc coefficient: mean).
template <typename scalar_t>
auto sums_step(const scalar_t* dyp, const scalar_t* xp) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using Set = typename ChannelCoefs<typename IO::acc_t, 1, IO::kParts>::Set;
  return [=](int64_t i, int64_t n, const Set& s, V* g, V* t) BNEXT_STEP {
    IO::load_n(dyp + i, g, n);
    IO::load_n(xp + i, t, n);
#pragma GCC unroll 4
    for (int j = 0; j < IO::kParts; ++j) t[j] = t[j] - s.v[0][j];
  };
}

// grad_input step in the acc dtype, coefficients a, mean, b, k:
// dx = dy * a + (x - mean) * b + k.
template <typename scalar_t>
auto dx_step(const scalar_t* dyp, const scalar_t* xp, scalar_t* dxp) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  using Set = typename ChannelCoefs<typename IO::acc_t, 4, P>::Set;
  return [=](int64_t i, int64_t n, const Set& s, bool stream) BNEXT_STEP {
    V g[P], xv[P];
    IO::load_n(dyp + i, g, n);
    IO::load_n(xp + i, xv, n);
#pragma GCC unroll 4
    for (int j = 0; j < P; ++j) {
      g[j] = at::vec::fmadd(
          g[j], s.v[0][j], at::vec::fmadd(xv[j] - s.v[1][j], s.v[2][j], s.v[3][j]));
    }
    IO::store_n(dxp + i, g, n, stream);
  };
}

// float32 grad_input step in double (backward_elementwise_f32_exact),
// coefficients a, b, k - mean * b.
inline auto dx_step_f32_exact(const float* dyp, const float* xp, float* dxp) {
  using IO = VecIO<float>;
  using V = Vectorized<float>;
  using D = Vectorized<double>;
  using Widen = ToDouble<float>;
  using Set = typename ChannelCoefs<double, 3, Widen::kParts>::Set;
  return [=](int64_t i, int64_t n, const Set& s, bool stream) BNEXT_STEP {
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

template <typename scalar_t>
void backward_reduce_impl(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean_t,
    at::Tensor& sum_dy_out,
    at::Tensor& sum_dy_xmu_out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Coefs = ChannelCoefs<acc_t, 1, IO::kParts>;
  // The fused ops' reduction with g = dy and t = x - mean.
  reduce_steps<IO>(
      make_layout(x), Coefs{{mean_t.const_data_ptr<acc_t>()}},
      sums_step<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>()),
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
  const StepOutput out = StepOutput::of(L, dxp, use_x ? 3 : 2);
  if constexpr (use_x) {
    elementwise_steps<IO::kStep>(L, coefs, out, dx_step<scalar_t>(dyp, xp, dxp));
  } else {
    elementwise_steps<IO::kStep>(
        L, coefs, out,
        [=](int64_t i, int64_t n, const typename Coefs::Set& s, bool stream) BNEXT_STEP {
          V g[P];
          IO::load_n(dyp + i, g, n);
#pragma GCC unroll 4
          for (int j = 0; j < P; ++j) g[j] = g[j] * s.v[0][j];
          IO::store_n(dxp + i, g, n, stream);
        });
  }
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
  using Coefs = ChannelCoefs<double, 3, ToDouble<float>::kParts>;  // a, b, k - mean * b
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
      L, coefs, StepOutput::of(L, dxp, 3), dx_step_f32_exact(dyp, xp, dxp));
}

// Training backward of a planar input, one channel at a time
// (backward_planar): sums over the channel's N planes, its coefficients,
// then its grad_input planes, re-read from L2. `exact` (float32 only):
// grad_input in double, as backward_elementwise_f32_exact.
template <typename scalar_t, bool exact>
void backward_planar_impl(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean_t,
    const at::Tensor& mean_hi_t,
    const at::Tensor& invstd_t,
    const at::Tensor& w_t,
    at::Tensor& dx,
    at::Tensor& grad_weight,
    at::Tensor& grad_bias) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using coef_t = std::conditional_t<exact, double, acc_t>;
  constexpr int64_t K = IO::kStep;
  using SumCoefs = ChannelCoefs<acc_t, 1, IO::kParts>;
  using DxCoefs = std::conditional_t<exact, ChannelCoefs<double, 3, ToDouble<float>::kParts>,
                                     ChannelCoefs<acc_t, 4, IO::kParts>>;
  const ChannelLayout L = make_layout(x);
  const int64_t C = L.C, N = L.N, S = L.S;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const double* mean = mean_t.const_data_ptr<double>();
  const acc_t* mean_hi = mean_hi_t.const_data_ptr<acc_t>();
  const acc_t* invstd = invstd_t.const_data_ptr<acc_t>();
  const acc_t* w = w_t.const_data_ptr<acc_t>();
  double* gw = grad_weight.mutable_data_ptr<double>();
  double* gb = grad_bias.mutable_data_ptr<double>();
  // Coefficients, each channel's written by the task that then uses them.
  std::vector<coef_t> a(static_cast<size_t>(C)), b(static_cast<size_t>(C)),
      k(static_cast<size_t>(C));
  DxCoefs dx_coefs{};
  if constexpr (exact) {
    dx_coefs = DxCoefs{{a.data(), b.data(), k.data()}};  // k - mean * b
  } else {
    dx_coefs = DxCoefs{{a.data(), mean_hi, b.data(), k.data()}};
  }
  const SumCoefs sum_coefs{{mean_hi}};
  const auto sum_step = sums_step<scalar_t>(dyp, xp);
  const auto grad_step = [&] {
    if constexpr (exact) {
      return dx_step_f32_exact(dyp, xp, dxp);
    } else {
      return dx_step<scalar_t>(dyp, xp, dxp);
    }
  }();
  const StepOutput out = StepOutput::of(L, dxp, 3);
  const double inv_n = 1.0 / static_cast<double>(N * S);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    const SumCoefs sum_coefs_l = sum_coefs;  // local copies: see elementwise_steps
    const DxCoefs dx_coefs_l = dx_coefs;
    auto sum_step_l = sum_step;
    auto grad_step_l = grad_step;
    for (int64_t c = begin; c < end; ++c) {
      double sum_dy = 0, sum_dy_xmu = 0;
      for (int64_t n = 0; n < N; ++n) {
        const auto [sg, sgt] =
            run_pair_sums<IO>(sum_coefs_l, sum_step_l, c, (n * C + c) * S, S);
        sum_dy += sg;
        sum_dy_xmu += sgt;
      }
      const double kernel_mean = exact ? mean[c] : static_cast<double>(mean_hi[c]);
      const ChannelBackward r = channel_backward(
          mean[c], static_cast<double>(mean_hi[c]), kernel_mean, static_cast<double>(invstd[c]),
          static_cast<double>(w[c]), sum_dy, sum_dy_xmu, inv_n);
      gw[c] = r.grad_weight;
      gb[c] = r.grad_bias;
      a[c] = static_cast<coef_t>(r.a);
      b[c] = static_cast<coef_t>(r.bx);
      k[c] = exact ? static_cast<coef_t>(r.k - mean[c] * r.bx) : static_cast<coef_t>(r.k);
      for (int64_t n = 0; n < N; ++n) {
        plane_steps<K>(dx_coefs_l, grad_step_l, c, (n * C + c) * S, S, out.stream);
      }
    }
    if (out.stream) {
      stream_fence();
    }
  });
}

}  // namespace

bool backward_planar_applies(const at::Tensor& x) {
  // BNEXT_PLANAR_BACKWARD=0|1 forces the choice (for tests: the automatic
  // one needs tensors larger than the last-level cache).
  static const int forced = [] {
    const char* env = std::getenv("BNEXT_PLANAR_BACKWARD");
    return env == nullptr ? -1 : std::atoi(env) != 0;
  }();
  const ChannelLayout L = make_layout(x);
  if (L.channels_inner || L.N == 0 || L.S == 0) {
    return false;
  }
  if (forced >= 0) {
    return forced != 0;
  }
  // Where x and dy fit the LLC together, the two-pass backward reads them
  // the second time from it, and was faster here: its sums and passes are
  // parallel over planes, not channels, and 7x7 planes take the
  // channel-block sums. Same-process A/B on the CI VM (while another
  // guest loaded it: torch ran 2x slower than usual), float32 batch 32,
  // backward op, this path's speed over the two-pass one in three
  // processes: 256x56x56 1.43x, 1.33x, 2.09x; 64x112x112 1.28x, 1.21x,
  // 1.40x. In cache it lost: 128x28x28 (x and dy 26 MB) 0.75x and 0.93x,
  // 2048x7x7 0.55x and 0.66x.
  const int64_t bytes = L.N * L.C * L.S * x.element_size();
  return L.S > kSmallPlaneElems && L.C >= kPlanarBackwardChannelsPerThread * at::get_num_threads() &&
      !fits_last_level_cache(2 * bytes);
}

std::tuple<at::Tensor, at::Tensor> backward_planar(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& mean_hi,
    const at::Tensor& invstd,
    const at::Tensor& w,
    bool exact_f32,
    at::Tensor& dx) {
  const auto opts = x.options().dtype(at::kDouble);
  const int64_t C = x.size(1);
  at::Tensor grad_weight = at::empty({C}, opts);
  at::Tensor grad_bias = at::empty({C}, opts);
  if (exact_f32) {
    TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kFloat);
    backward_planar_impl<float, true>(dy, x, mean, mean_hi, invstd, w, dx, grad_weight, grad_bias);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_backward_planar", [&] {
          backward_planar_impl<scalar_t, false>(
              dy, x, mean, mean_hi, invstd, w, dx, grad_weight, grad_bias);
        });
  }
  return {grad_weight, grad_bias};
}

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
