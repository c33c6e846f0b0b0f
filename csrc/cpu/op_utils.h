// Steps shared by the CPU op entry points (plain and fused): turning the
// statistics a call has into the per-channel coefficients its kernels use.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>

#include "channel_math.h"

namespace bnext::cpu {

// Elements per channel: N * prod(spatial).
inline int64_t per_channel_count(const at::Tensor& input) {
  return input.size(1) == 0 ? 0 : input.numel() / input.size(1);
}

inline at::Tensor empty_output(const at::Tensor& input, at::MemoryFormat fmt) {
  return at::empty(input.sizes(), input.options().memory_format(fmt));
}

// Training: batch statistics of the dense input `x` and the coefficients
// that normalize it. mean is float64, invstd/unbiased_var acc dtype.
struct TrainNormalization {
  at::Tensor mean, invstd, unbiased_var;
  NormalizeCoeffs k;
};
TrainNormalization train_normalization(
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps);

// Eval: the coefficients from the running statistics.
NormalizeCoeffs eval_normalization(
    const at::Tensor& input,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps);

// The (mean float64, invstd acc) a backward normalizes with: the saved batch
// statistics (train) or the running ones (eval), as in
// aten::native_batch_norm_backward.
std::pair<at::Tensor, at::Tensor> backward_statistics(
    const at::Tensor& input,
    bool train,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean,
    const std::optional<at::Tensor>& save_invstd,
    double eps,
    const char* op_name);

}  // namespace bnext::cpu
