// Steps shared by the CPU op entry points (plain and fused): turning the
// statistics a call has into the per-channel coefficients its kernels use.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>

#include "channel_math.h"

namespace bnext::cpu {

// An optional tensor that is given (and defined).
inline bool has(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// A fused op's optional input (residual, g) dense in `fmt`, or undefined.
inline at::Tensor dense_or_undefined(const std::optional<at::Tensor>& t, at::MemoryFormat fmt) {
  return has(t) ? t->contiguous(fmt) : at::Tensor();
}

// Elements per channel: N * prod(spatial).
inline int64_t per_channel_count(const at::Tensor& input) {
  return input.size(1) == 0 ? 0 : input.numel() / input.size(1);
}

// An op allocates its input-sized output before any per-channel tensor, as
// torch's kernels do. Small tensors allocated before the output and freed
// after it can make glibc hand the output a different free block from call
// to call (see EvalScratch), and an output that moves around costs cache
// misses an in-cache tensor would not have. For the eval, output-first
// alone was not enough; EvalScratch (no per-channel tensors) is.
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

// Stack room for the eval coefficients (alpha, beta) of up to kChannels
// channels, so that an eval with weight and bias allocates no per-channel
// buffer on the heap, only its output (and small tensor headers):
// per-channel tensors allocated before the output and freed after it shift
// the free block glibc hands the output from call to call.
struct EvalScratch {
  static constexpr int64_t kChannels = 2048;
  alignas(64) double alpha[kChannels];
  alignas(64) double beta[kChannels];
};

// Eval: the coefficients from the running statistics. mean_hi is
// running_mean itself (already in the acc dtype); alpha and beta live in
// `scratch` up to its size: the result must not outlive it.
NormalizeCoeffs eval_normalization(
    const at::Tensor& input,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    EvalScratch& scratch);

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
