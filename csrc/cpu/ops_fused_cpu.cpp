// CPU implementations of the fused BatchNorm + activation ops: checks, then
// the same statistics as plain batch norm and the fused passes of
// fused_forward.cpp / fused_backward_*.cpp, reached through the op table.
#include <ATen/TensorOperators.h>

#include <string_view>

#include "../checks.h"
#include "fused_kernels.h"
#include "op_table.h"
#include "op_utils.h"

namespace bnext::cpu {

namespace {

using at::Tensor;
using std::optional;

ActSpec act_spec(
    c10::string_view activation,
    double negative_slope,
    bool memory_saving,
    const optional<Tensor>& weight) {
  const std::string_view name(activation.data(), activation.size());
  if (memory_saving) {
    check_memory_saving(name, negative_slope, weight);
  }
  return ActSpec{parse_activation(name), negative_slope};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_train(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& residual,
    double eps,
    c10::string_view activation,
    double negative_slope,
    bool memory_saving) {
  check_batch_norm_args(input, weight, bias, std::nullopt, std::nullopt);
  check_eps(eps, /*training=*/true);
  check_residual(input, residual);
  const ActSpec spec = act_spec(activation, negative_slope, memory_saving, weight);
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  Tensor out = empty_output(input, fmt);  // first: see empty_output
  const TrainNormalization t = train_normalization(x, weight, bias, eps);
  normalize_act(x, dense_or_undefined(residual, fmt), t.k.mean_hi, t.k.alpha, t.k.beta, spec, out);
  return {out, t.mean, t.invstd, t.unbiased_var};
}

Tensor batch_norm_act_eval(
    const Tensor& input,
    const optional<Tensor>& running_mean_opt,
    const optional<Tensor>& running_var_opt,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& residual,
    double eps,
    c10::string_view activation,
    double negative_slope,
    bool memory_saving) {
  check_batch_norm_call(
      input, weight, bias, running_mean_opt, running_var_opt, std::nullopt, false, eps);
  check_residual(input, residual);
  if (input.numel() == 0) {
    return empty_batch_output(input, weight, bias);
  }
  const Tensor& running_mean = *running_mean_opt;
  const Tensor& running_var = *running_var_opt;
  const ActSpec spec = act_spec(activation, negative_slope, memory_saving, weight);
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  EvalScratch scratch;
  const NormalizeCoeffs k =
      eval_normalization(input, running_mean, running_var, weight, bias, eps, scratch);
  Tensor out = empty_output(input, fmt);
  normalize_act(x, dense_or_undefined(residual, fmt), k.mean_hi, k.alpha, k.beta, spec, out);
  return out;
}

std::tuple<optional<Tensor>, optional<Tensor>, optional<Tensor>, optional<Tensor>>
batch_norm_act_backward(
    const Tensor& grad_output,
    const Tensor& saved,
    bool saved_is_output,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& residual,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& save_mean,
    const optional<Tensor>& save_invstd,
    bool train,
    double eps,
    c10::string_view activation,
    double negative_slope,
    std::array<bool, 4> output_mask) {
  check_batch_norm_args(saved, weight, bias, std::nullopt, std::nullopt);
  check_residual(saved, residual);
  check_grad_output(grad_output, saved);
  const ActSpec spec = act_spec(activation, negative_slope, saved_is_output, weight);
  const at::MemoryFormat fmt = output_memory_format(saved);
  const Tensor s = saved.contiguous(fmt);
  const Tensor dy = grad_output.contiguous(fmt);
  const Tensor r = dense_or_undefined(residual, fmt);
  Tensor dx = output_mask[0] ? empty_output(saved, fmt) : Tensor();  // first: see empty_output
  const int64_t C = saved.size(1);
  const at::ScalarType acc = acc_dtype(saved.scalar_type());
  const auto [mean, invstd] = backward_statistics(
      saved, train, running_mean, running_var, save_mean, save_invstd, eps,
      "batch_norm_act_backward");
  const Tensor w = channel_param(weight, C, acc, 1.0);
  const Tensor b = channel_param(bias, C, acc, 0.0);

  // From the input, t = x - m_hi with the forward's own coefficients (the
  // recomputed pre-activation is bit-identical, so is every relu mask).
  // From the output, t = w * x_hat = (x - mean) * w * invstd.
  Tensor mean_hi, alpha, beta;
  Tensor x_per_t;  // (x - mean) = t * x_per_t, float64 (from the output)
  if (saved_is_output) {
    beta = b;
    x_per_t = (w.to(at::kDouble) * invstd.to(at::kDouble)).reciprocal();
  } else {
    NormalizeCoeffs nk = normalize_coeffs(mean, invstd, w, b, acc);
    mean_hi = nk.mean_hi;
    alpha = nk.alpha;
    beta = nk.beta;
  }
  const GradSource src{s, saved_is_output, r, mean_hi, alpha, beta, spec};

  // With a residual, pass 1 always runs: it writes g, which is both
  // grad_residual and pass 2's input.
  const bool need_sums =
      r.defined() || output_mask[2] || output_mask[3] || (train && output_mask[0]);
  Tensor g, sum_g, sum_gt;
  bool dx_done = false;
  if (need_sums) {
    const auto d_opts = s.options().dtype(at::kDouble);
    sum_g = at::empty({C}, d_opts);
    sum_gt = at::empty({C}, d_opts);
    if (r.defined()) {
      g = empty_output(saved, fmt);
    }
    dx_done = train && output_mask[0] &&
        act_backward_resident(dy, src, {mean, invstd, w, x_per_t}, g, sum_g, sum_gt, dx);
    if (!dx_done) {
      act_backward_reduce(dy, src, g, sum_g, sum_gt);
      if (saved_is_output) {
        sum_gt = sum_gt * x_per_t;  // now sum g * (x - mean)
      }
    }
  }
  const at::ScalarType param_dtype = has(weight) ? weight->scalar_type() : acc;
  const Tensor& centre = saved_is_output ? mean : mean_hi;
  BackwardCoeffs k = backward_coeffs(
      mean, centre, centre, invstd, w, sum_g, sum_gt, per_channel_count(saved), train,
      at::kDouble, param_dtype);
  if (saved_is_output && !dx_done) {
    k.bx = k.bx * x_per_t;  // coefficient of t instead of (x - mean)
  }

  optional<Tensor> grad_input, grad_residual, grad_weight, grad_bias;
  if (output_mask[0]) {
    if (!dx_done) {
      act_backward_elementwise(dy, src, g, k.a, k.bx, k.k, dx);
    }
    grad_input = dx;
  }
  if (output_mask[1]) {
    TORCH_CHECK(r.defined(), "batch_norm_act_backward: grad_residual requested without a residual");
    grad_residual = g;
  }
  if (output_mask[2]) {
    grad_weight = k.grad_weight;
  }
  if (output_mask[3]) {
    grad_bias = k.grad_bias;
  }
  return {grad_input, grad_residual, grad_weight, grad_bias};
}

}  // namespace

void fill_fused_ops(OpTable& table) {
  table.batch_norm_act_train = &batch_norm_act_train;
  table.batch_norm_act_eval = &batch_norm_act_eval;
  table.batch_norm_act_backward = &batch_norm_act_backward;
}

}  // namespace bnext::cpu
