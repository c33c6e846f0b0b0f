// CPU kernels of the fused BatchNorm + activation (+ residual) ops. Inputs
// are dense in output_memory_format(input); per-channel tensors contiguous.
//
// Forward: y = act((x - m_hi) * alpha + beta + r), the normalize_coeffs of
// the statistics. Backward works on g = dy * act'(z) and a per-element
// "centred" t, with (x - mean) an affine function of t per channel:
//   from the input  (default):        t = x - m_hi
//   from the output (memory_saving):  t = act^-1(y) - r - bias = w * x_hat
// Pass 1 sums g and g * t per channel (and writes g as grad_residual when
// there is a residual); pass 2 writes dx = g * A + t * B + K in double.
#pragma once
#include <ATen/core/Tensor.h>

#include "activation.h"

namespace bnext::cpu {

struct ActSpec {
  Act act;
  double negative_slope;
};

// `residual` may be undefined.
void normalize_act(
    const at::Tensor& x,
    const at::Tensor& residual,
    const at::Tensor& mean_hi,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    ActSpec spec,
    at::Tensor& out);

// Coefficients that rebuild g and t: m_hi, alpha, beta as in the forward
// (from the input), or only `bias` (from the output; m_hi/alpha unused).
struct GradSource {
  const at::Tensor& saved;  // x, or y when saved_is_output (memory_saving)
  bool saved_is_output;
  const at::Tensor& residual;  // may be undefined
  const at::Tensor& mean_hi;
  const at::Tensor& alpha;
  const at::Tensor& beta;  // normalize beta (from input) or bias (from output)
  ActSpec spec;
};

// Fills sum_g / sum_gt (C,) float64; writes g into grad_residual when the
// source has a residual (grad_residual then has x's size and layout).
void act_backward_reduce(
    const at::Tensor& dy,
    const GradSource& src,
    at::Tensor& grad_residual,
    at::Tensor& sum_g,
    at::Tensor& sum_gt);

// The statistics a training backward derives its coefficients from: mean
// (C,) float64, invstd and w (C,) acc dtype, and x_per_t (C,) float64 (from
// the output: x - mean = t * x_per_t; else undefined).
struct ActBackwardStats {
  const at::Tensor& mean;
  const at::Tensor& invstd;
  const at::Tensor& w;
  const at::Tensor& x_per_t;
};

// Training pass 1 and grad_input in one resident walk
// (resident_driver.h): fills sum_g and sum_gt (sum g * (x - mean), scaled
// as the op's two-pass path scales it), grad_residual when the source has
// a residual, and dx, with backward_coeffs' coefficients. Returns false,
// having written nothing, where the walk does not apply.
bool act_backward_resident(
    const at::Tensor& dy,
    const GradSource& src,
    const ActBackwardStats& stats,
    at::Tensor& grad_residual,
    at::Tensor& sum_g,
    at::Tensor& sum_gt,
    at::Tensor& dx);

// dx = g * A + t * B + K with (C,) float64 A, B, K (BackwardCoeffs' a, bx, k,
// channel_math.h, in the fused ops' terms g and t). With a residual, g is
// read from `grad_residual` (pass 1 wrote it; required then) for float and
// double, and recomputed for half types.
void act_backward_elementwise(
    const at::Tensor& dy,
    const GradSource& src,
    const at::Tensor& grad_residual,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& K,
    at::Tensor& dx);

}  // namespace bnext::cpu
