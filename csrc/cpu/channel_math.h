// Per-channel (length C) arithmetic between the passes over the data: turning
// statistics into the coefficients the elementwise kernels consume. All
// tensors here are contiguous (C,) in the accumulation dtype.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace bnext::cpu {

// `t` converted to acc dtype and made contiguous, or `fill` when absent.
at::Tensor channel_param(
    const std::optional<at::Tensor>& t,
    int64_t channels,
    at::ScalarType acc,
    double fill);

// invstd = 1 / sqrt(var + eps)
at::Tensor invstd_from_var(const at::Tensor& var, double eps);

// var * n / (n - 1): Bessel's correction for the running variance.
at::Tensor unbiased_from_biased(const at::Tensor& var, int64_t n);

// Elementwise product a * b.
at::Tensor channel_mul(const at::Tensor& a, const at::Tensor& b);

// Coefficients of grad_input = dy * a + (x - mean) * b + c for training mode,
// from weight w, invstd and the backward sums over n elements per channel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_grad_input_coeffs(
    const at::Tensor& w,
    const at::Tensor& invstd,
    const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu,
    int64_t n);

// running = (1 - f) * running + f * batch for mean and var together. Both new
// values are computed before either buffer is written.
void update_running(
    at::Tensor& running_mean,
    at::Tensor& running_var,
    const at::Tensor& batch_mean,
    const at::Tensor& batch_unbiased_var,
    double factor);

}  // namespace bnext::cpu
