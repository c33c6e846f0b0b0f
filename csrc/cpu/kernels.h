// CPU kernel entry points. Inputs are dense in output_memory_format(input);
// per-channel tensors are contiguous in the accumulation dtype (acc_dtype).
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace bnext::cpu {

// Per-channel batch mean and biased variance (Welford/Chan, never
// E[x^2] - E[x]^2). Returns (mean, biased_var): mean (C,) in float64 (the
// combine's precision, kept so that normalization can subtract it exactly),
// var (C,) in acc dtype.
std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x);

// Per-channel sums of dy and dy * (x - mean), one pass, returned in float64.
std::tuple<at::Tensor, at::Tensor> backward_reduce(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean);

// dx = dy * a + (x - mean) * b + c, channel-wise. float32 input with float64
// mean/a/b/c is evaluated in double per element. (b, c may be zero: then x is
// not read when `use_x` is false).
void backward_elementwise(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& a,
    const at::Tensor& b,
    const at::Tensor& c,
    bool use_x,
    at::Tensor& dx);

}  // namespace bnext::cpu
