// CPU implementations of the bnext ops: argument checks, layout choice and
// the sequence of passes. The loops themselves live in stats.cpp,
// fused_forward.cpp (normalization is the fused pass with the identity) and
// backward.cpp. The ops reach the dispatcher through this level's op table
// (op_table.h).
#include <ATen/ops/empty.h>

#include "../checks.h"
#include "channel_math.h"
#include "fused_kernels.h"
#include "kernels.h"
#include "op_table.h"
#include "op_utils.h"

namespace bnext::cpu {

namespace {

using at::Tensor;
using std::optional;

constexpr ActSpec kIdentity{Act::Identity, 0.0};

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_train(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    double eps) {
  check_batch_norm_args(input, weight, bias, std::nullopt, std::nullopt);
  check_eps(eps, /*training=*/true);
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  // The output first: see empty_output.
  Tensor out = empty_output(input, fmt);
  const TrainNormalization t = train_normalization(x, weight, bias, eps);
  normalize_act(x, Tensor(), t.k.mean_hi, t.k.alpha, t.k.beta, kIdentity, out);
  return {out, t.mean, t.invstd, t.unbiased_var};
}

Tensor batch_norm_eval(
    const Tensor& input,
    const optional<Tensor>& running_mean_opt,
    const optional<Tensor>& running_var_opt,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    double eps) {
  check_batch_norm_call(
      input, weight, bias, running_mean_opt, running_var_opt, std::nullopt, false, eps);
  if (input.numel() == 0) {
    return empty_batch_output(input, weight, bias);
  }
  const Tensor& running_mean = *running_mean_opt;
  const Tensor& running_var = *running_var_opt;
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  EvalScratch scratch;
  const NormalizeCoeffs k =
      eval_normalization(input, running_mean, running_var, weight, bias, eps, scratch);
  Tensor out = empty_output(input, fmt);
  normalize_act(x, Tensor(), k.mean_hi, k.alpha, k.beta, kIdentity, out);
  return out;
}

void update_running_stats(
    Tensor& running_mean,
    Tensor& running_var,
    const Tensor& save_mean,
    const Tensor& unbiased_var,
    optional<double> momentum,
    const optional<Tensor>& num_batches_tracked) {
  check_update_running_args(
      running_mean, running_var, save_mean, unbiased_var, momentum, num_batches_tracked);
  double factor = 0.0;
  if (momentum.has_value()) {
    factor = *momentum;
  } else {
    const int64_t count = num_batches_tracked->item<int64_t>();
    TORCH_CHECK(
        count > 0, "update_running_stats: num_batches_tracked must be "
        "positive for a cumulative average, got ", count);
    factor = 1.0 / static_cast<double>(count);
  }
  // Statistics in float32 or float64 are read as they are (the training
  // op gives a float64 mean and an acc-dtype variance); others as float32.
  auto as_stat = [](const Tensor& t) {
    const bool direct = t.scalar_type() == at::kDouble || t.scalar_type() == at::kFloat;
    return (direct ? t : t.to(at::kFloat)).contiguous();
  };
  update_running(running_mean, running_var, as_stat(save_mean), as_stat(unbiased_var), factor);
}

std::tuple<optional<Tensor>, optional<Tensor>, optional<Tensor>>
batch_norm_backward(
    const Tensor& grad_output,
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& save_mean,
    const optional<Tensor>& save_invstd,
    bool train,
    double eps,
    std::array<bool, 3> output_mask) {
  check_batch_norm_args(input, weight, std::nullopt, std::nullopt, std::nullopt);
  check_grad_output(grad_output, input);
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor dy = grad_output.contiguous(fmt);
  // The output first: see empty_output.
  Tensor dx = output_mask[0] ? empty_output(input, fmt) : Tensor();
  const int64_t C = input.size(1);
  const int64_t n = per_channel_count(input);
  const at::ScalarType acc = acc_dtype(input.scalar_type());

  const auto [mean, invstd] = backward_statistics(
      input, train, running_mean, running_var, save_mean, save_invstd, eps,
      "batch_norm_backward");
  // mean_hi, the two sums and the three grad_input coefficients.
  ChannelScratch scratch(C, 6, x.options());
  Tensor mean_hi = mean;
  if (acc != at::kDouble) {
    mean_hi = scratch.take(acc);  // float32: the mean rounded once
    const double* m = mean.const_data_ptr<double>();
    float* h = mean_hi.mutable_data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) {
      h[c] = static_cast<float>(m[c]);
    }
  }
  const bool has_weight = weight.has_value() && weight->defined();
  const at::ScalarType param_dtype = has_weight ? weight->scalar_type() : acc;

  const Tensor w = channel_param(weight, C, acc, 1.0);
  const bool need_sums =
      output_mask[1] || output_mask[2] || (train && output_mask[0]);
  Tensor sum_dy, sum_dy_xmu;
  bool dx_done = false;
  if (need_sums) {
    sum_dy = scratch.take(at::kDouble);
    sum_dy_xmu = scratch.take(at::kDouble);
    dx_done = train && output_mask[0] &&
        backward_resident(dy, x, mean, mean_hi, invstd, w, sum_dy, sum_dy_xmu, dx);
    if (!dx_done) {
      backward_reduce(dy, x, mean_hi, sum_dy, sum_dy_xmu);
    }
  }
  // float32 training grad_input is evaluated in double per element (see
  // backward_elementwise_f32_exact), so it gets float64 coefficients and
  // subtracts the float64 mean; other dtypes use acc-dtype coefficients.
  const bool exact_f32 = train && input.scalar_type() == at::kFloat;
  const Tensor kernel_mean = exact_f32 ? mean : mean_hi;
  const BackwardCoeffs k = backward_coeffs(
      mean, mean_hi, kernel_mean, invstd, w, sum_dy, sum_dy_xmu, n, train,
      exact_f32 ? at::kDouble : acc, param_dtype, &scratch);

  optional<Tensor> grad_input, grad_weight, grad_bias;
  if (output_mask[0]) {
    if (!dx_done) {
      backward_elementwise(dy, x, kernel_mean, k.a, k.bx, k.k, /*use_x=*/train, dx);
    }
    grad_input = dx;
  }
  if (output_mask[1]) {
    grad_weight = k.grad_weight;
  }
  if (output_mask[2]) {
    grad_bias = k.grad_bias;
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

void fill_plain_ops(OpTable& table) {
  table.batch_norm_train = &batch_norm_train;
  table.batch_norm_eval = &batch_norm_eval;
  table.update_running_stats = &update_running_stats;
  table.batch_norm_backward = &batch_norm_backward;
}

}  // namespace bnext::cpu
