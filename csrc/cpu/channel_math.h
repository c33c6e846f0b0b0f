// Per-channel (length C) arithmetic between the passes over the data: turning
// statistics into the coefficients the elementwise kernels consume.
//
// Means are carried in float64. Kernels subtract a float `mean_hi`, and the
// remainder lo = mean - mean_hi is folded into the per-channel constant term
// here, so (x - mean) is effectively exact even when |mean| >> std, at no
// per-element cost.
#pragma once
#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace bnext::cpu {

// `t` converted to `dtype` and made contiguous, or `fill` when absent.
at::Tensor channel_param(
    const std::optional<at::Tensor>& t,
    int64_t channels,
    at::ScalarType dtype,
    double fill);

// invstd = 1 / sqrt(var + eps), in var's dtype.
template <typename T>
inline T invstd_of(T var, T eps) {
  return T(1) / std::sqrt(var + eps);
}
at::Tensor invstd_from_var(const at::Tensor& var, double eps);

// var * n / (n - 1): Bessel's correction for the running variance.
at::Tensor unbiased_from_biased(const at::Tensor& var, int64_t n);

// Several (C,) temporaries carved from one allocation: at a few channels,
// each at::empty is a dispatched call and a malloc, which a small call
// notices. The tensors share the scratch's memory and must not outlive it.
class ChannelScratch {
 public:
  ChannelScratch(int64_t channels, int slots, const at::TensorOptions& options);
  // The next slot, as a (C,) tensor of `dtype` (float32 or float64).
  at::Tensor take(at::ScalarType dtype);

 private:
  int64_t channels_;
  int64_t slot_bytes_;
  int slots_;
  int used_ = 0;
  at::Tensor buffer_;
};

// Coefficients of out = (x - mean_hi) * alpha + beta, all (C,) in `acc`,
// equal to (x - mean) * invstd * w + b for the float64 `mean`.
struct NormalizeCoeffs {
  at::Tensor mean_hi, alpha, beta;
};
// One channel of them, in T: mean_hi = T(mean); the float64 remainder
// mean - mean_hi is folded into beta.
template <typename T>
struct ChannelNormalize {
  T mean_hi, alpha, beta;
};
template <typename T>
inline ChannelNormalize<T> channel_normalize(double mean, T invstd, T w, T b) {
  const T hi = static_cast<T>(mean);
  const double lo = mean - static_cast<double>(hi);
  const T alpha = invstd * w;
  return {hi, alpha, static_cast<T>(static_cast<double>(b) - lo * static_cast<double>(alpha))};
}
NormalizeCoeffs normalize_coeffs(
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& w,
    const at::Tensor& b,
    at::ScalarType acc);

// Backward in one place: grad_input = dy * a + (x - kernel_mean) * bx + k
// and the grad_weight/grad_bias sums, from the float64 sums that the
// reduction took around `reduce_mean`, all computed in float64. a, bx, k
// come out in `coeff_dtype`, the gradients in `grad_dtype` (the weight's).
struct BackwardCoeffs {
  at::Tensor a, bx, k;       // (C,) coeff_dtype: grad_input coefficients
  at::Tensor grad_weight;    // (C,) grad_dtype: sum dy * (x - mean) * invstd
  at::Tensor grad_bias;      // (C,) grad_dtype: sum dy
};
// a, bx and k come from `scratch` when it is given (then they live as long
// as it does), else from their own allocations.
BackwardCoeffs backward_coeffs(
    const at::Tensor& mean,         // float64
    const at::Tensor& reduce_mean,  // centre of sum_dy_xmu (float32/64)
    const at::Tensor& kernel_mean,  // centre the elementwise kernel subtracts
    const at::Tensor& invstd,       // acc (float32/64)
    const at::Tensor& w,            // acc (float32/64)
    const at::Tensor& sum_dy,       // float64, may be undefined if unused
    const at::Tensor& sum_dy_xmu,   // float64, may be undefined
    int64_t n,
    bool train,
    at::ScalarType coeff_dtype,
    at::ScalarType grad_dtype,
    ChannelScratch* scratch = nullptr);

// One channel of backward_coeffs, in double (also used by the resident
// backward walks, channel by channel): grad_input = dy * a +
// (x - kernel_mean) * b + k. sum_dy_xmu was summed around reduce_mean.
struct ChannelBackward {
  double a, b, k, grad_weight, grad_bias;
};
inline ChannelBackward channel_backward(
    double mean, double reduce_mean, double kernel_mean, double invstd, double w,
    double sum_dy, double sum_dy_xmu, double inv_n, bool train) {
  const double sx = sum_dy_xmu - (mean - reduce_mean) * sum_dy;  // sum dy * (x - mean)
  double b = 0.0, k = 0.0;
  if (train) {
    // dx = w*invstd*(dy - mean(dy) - (x - mean)*invstd^2*mean(dy*(x - mean)))
    b = -w * invstd * invstd * invstd * sx * inv_n;
    k = -w * invstd * sum_dy * inv_n - (mean - kernel_mean) * b;
  }
  return {w * invstd, b, k, sx * invstd, sum_dy};
}
// Without the sums (eval grad_input only): dx = dy * w * invstd.
inline ChannelBackward channel_backward_no_sums(double invstd, double w) {
  return {w * invstd, 0.0, 0.0, 0.0, 0.0};
}

// running = (1 - f) * running + f * batch for mean and var together. Both new
// values are computed before either buffer is written. batch_mean and
// batch_unbiased_var are float32 or float64, each in its own dtype.
void update_running(
    at::Tensor& running_mean,
    at::Tensor& running_var,
    const at::Tensor& batch_mean,
    const at::Tensor& batch_unbiased_var,
    double factor);

}  // namespace bnext::cpu
