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

// Per-channel sums of dy and dy * (x - mean), one pass, into (C,) float64
// sum_dy and sum_dy_xmu.
void backward_reduce(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean,
    at::Tensor& sum_dy,
    at::Tensor& sum_dy_xmu);

// Training backward_reduce and grad_input in one walk where a block of
// channels stays cached between the two (resident_driver.h): fills sum_dy,
// sum_dy_xmu (C,) float64 and dx, with the coefficients backward_coeffs
// gives (train, the float32 kernel subtracting the float64 mean). mean is
// (C,) float64; mean_hi, invstd, w are (C,) acc dtype. Returns false, having
// written nothing, where the walk does not apply.
bool backward_resident(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& mean_hi,
    const at::Tensor& invstd,
    const at::Tensor& w,
    at::Tensor& sum_dy,
    at::Tensor& sum_dy_xmu,
    at::Tensor& dx);

// dx = dy * a + (x - mean) * bx + k, channel-wise: the a, bx, k of
// BackwardCoeffs (channel_math.h). float32 input with float64 mean/a/bx/k is
// evaluated in double per element. (bx, k may be zero: then x is not read
// when `use_x` is false).
void backward_elementwise(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& a,
    const at::Tensor& bx,
    const at::Tensor& k,
    bool use_x,
    at::Tensor& dx);

}  // namespace bnext::cpu
