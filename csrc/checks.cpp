#include "checks.h"

#include <ATen/ops/any.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eq.h>
#include <c10/util/Exception.h>

#include <string>

namespace bnext {

namespace {

void check_per_channel(
    const at::Tensor& input,
    const std::optional<at::Tensor>& t,
    const char* name,
    std::optional<at::ScalarType>& param_dtype) {
  if (!t.has_value() || !t->defined()) {
    return;
  }
  // Symbolic sizes (torch.compile with dynamic shapes) are compared as such.
  const c10::SymInt channels = input.sym_size(1);
  TORCH_CHECK(
      t->sym_numel() == channels, name, " should contain ", channels,
      " elements not ", t->sym_numel());
  TORCH_CHECK(
      t->device() == input.device(),
      "Expected all tensors to be on the same device, but found input on ",
      input.device(), " and ", name, " on ", t->device());
  // torch accepts parameters in the input dtype, or float32 parameters with a
  // reduced-precision input (the AMP / mixed-precision case); all parameters
  // must agree with each other.
  if (!param_dtype.has_value()) {
    param_dtype = t->scalar_type();
    const bool same = *param_dtype == input.scalar_type();
    const bool mixed_ok = *param_dtype == at::kFloat &&
        (input.scalar_type() == at::kHalf ||
         input.scalar_type() == at::kBFloat16);
    TORCH_CHECK(
        same || mixed_ok, "bnext batch_norm: ", name, " has dtype ",
        *param_dtype, " but input has dtype ", input.scalar_type(),
        "; parameters and running stats must have the input's dtype, or "
        "float32 when the input is float16/bfloat16");
  } else {
    TORCH_CHECK(
        t->scalar_type() == *param_dtype, "bnext batch_norm: ", name,
        " has dtype ", t->scalar_type(), " but other parameters have dtype ",
        *param_dtype, "; all parameters and running stats must share a dtype");
  }
}

}  // namespace

void check_batch_norm_call(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked,
    bool training,
    double eps) {
  if (input.sym_numel() == 0) {
    check_eps(eps, training);
    return;
  }
  TORCH_CHECK_VALUE(
      input.dim() >= 2, "bnext batch_norm: expected input of shape (N, C, *) "
      "with at least 2 dimensions, got ", input.dim(), "D input");
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK_VALUE(
      has_mean == has_var,
      "running_mean and running_var must either both be None or neither be None");
  if (training) {
    c10::SymInt size_prods = input.sym_size(0);
    for (int64_t d = 2; d < input.dim(); ++d) {
      size_prods *= input.sym_size(d);
    }
    TORCH_CHECK_VALUE(
        size_prods != 1, "Expected more than 1 value per channel when training, got input size ",
        input.sym_sizes());
  } else {
    TORCH_CHECK(has_mean, "running_mean must be defined in evaluation mode");
  }
  check_eps(eps, training);
  check_batch_norm_args(input, weight, bias, running_mean, running_var);
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    TORCH_CHECK(
        num_batches_tracked->sym_numel() == 1 && num_batches_tracked->device() == input.device(),
        "bnext batch_norm: num_batches_tracked must be a one-element tensor on the input's "
        "device, got ", num_batches_tracked->sym_sizes(), " on ", num_batches_tracked->device());
  }
}

at::Tensor empty_batch_output(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias) {
  for (const auto* t : {&weight, &bias}) {
    TORCH_CHECK_INDEX(
        !t->has_value() || !(*t)->defined() || (*t)->sym_numel() > 0,
        "select(): index 0 out of range for tensor of size [0] at dimension 0");
  }
  return at::empty_symint(
      input.sym_sizes(), input.options().memory_format(output_memory_format(input)));
}

void check_batch_norm_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var) {
  TORCH_CHECK_VALUE(
      input.dim() >= 2, "bnext batch_norm: expected input of shape (N, C, *) "
      "with at least 2 dimensions, got ", input.dim(), "D input");
  TORCH_CHECK_NOT_IMPLEMENTED(
      input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble ||
          input.scalar_type() == at::kHalf ||
          input.scalar_type() == at::kBFloat16,
      "bnext batch_norm: input must be float32, float64, bfloat16 or "
      "float16, got ", input.scalar_type());
  std::optional<at::ScalarType> param_dtype;
  check_per_channel(input, weight, "weight", param_dtype);
  check_per_channel(input, bias, "bias", param_dtype);
  check_per_channel(input, running_mean, "running_mean", param_dtype);
  check_per_channel(input, running_var, "running_var", param_dtype);
}

at::MemoryFormat output_memory_format(const at::Tensor& input) {
  // torch's CPU rule: a tensor dense in some format keeps it, checked
  // contiguous first (ambiguous size-1 layouts resolve like torch's); any
  // other strides fall back to suggest_memory_format().
  if (input.dim() == 4 || input.dim() == 5) {
    if (input.is_contiguous()) {
      return at::MemoryFormat::Contiguous;
    }
    const auto cl = input.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                     : at::MemoryFormat::ChannelsLast3d;
    if (input.is_contiguous(cl)) {
      return cl;
    }
    return input.suggest_memory_format();
  }
  return at::MemoryFormat::Contiguous;
}

at::ScalarType acc_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_eps(double eps, bool training) {
  if (training) {
    TORCH_CHECK_VALUE(
        eps > 0.0, "batch_norm eps must be positive during training, but got ", eps);
  } else {
    TORCH_CHECK_VALUE(eps >= 0.0, "batch_norm eps must be non-negative, but got ", eps);
  }
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK(
      grad_output.sizes() == input.sizes(), "grad_output has size ",
      grad_output.sizes(), " but input has size ", input.sizes());
  TORCH_CHECK(
      grad_output.scalar_type() == input.scalar_type(),
      "grad_output dtype ", grad_output.scalar_type(),
      " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(
      grad_output.device() == input.device(),
      "Expected all tensors to be on the same device, but found input on ",
      input.device(), " and grad_output on ", grad_output.device());
}

void check_update_running_args(
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const at::Tensor& save_mean,
    const at::Tensor& unbiased_var,
    std::optional<double> momentum,
    const std::optional<at::Tensor>& num_batches_tracked) {
  const int64_t C = save_mean.numel();
  TORCH_CHECK(
      running_mean.numel() == C, "running_mean should contain ", C,
      " elements not ", running_mean.numel());
  TORCH_CHECK(
      running_var.numel() == C, "running_var should contain ", C,
      " elements not ", running_var.numel());
  TORCH_CHECK(
      unbiased_var.numel() == C, "unbiased_var should contain ", C,
      " elements not ", unbiased_var.numel());
  TORCH_CHECK(
      running_mean.scalar_type() == running_var.scalar_type() &&
          running_mean.device() == save_mean.device() &&
          running_var.device() == save_mean.device() &&
          unbiased_var.device() == save_mean.device(),
      "update_running_stats: running_mean and running_var must share a dtype "
      "and the statistics' device");
  if (!momentum.has_value()) {
    TORCH_CHECK(
        num_batches_tracked.has_value() && num_batches_tracked->defined() &&
            num_batches_tracked->numel() == 1,
        "update_running_stats: momentum=None (cumulative average) needs a "
        "one-element num_batches_tracked");
  }
}

void check_backward_statistics(
    bool train,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean,
    const std::optional<at::Tensor>& save_invstd,
    const char* op_name) {
  if (train) {
    TORCH_CHECK(
        save_mean.has_value() && save_invstd.has_value(), op_name,
        ": train=True needs save_mean and save_invstd");
  } else {
    TORCH_CHECK(
        running_mean.has_value() && running_var.has_value(), op_name,
        ": train=False needs running_mean and running_var");
  }
}

void check_residual(const at::Tensor& input, const std::optional<at::Tensor>& residual) {
  if (!residual.has_value() || !residual->defined()) {
    return;
  }
  TORCH_CHECK(
      residual->sym_sizes() == input.sym_sizes(), "bnext: residual has size ",
      residual->sym_sizes(), " but input has size ", input.sym_sizes());
  TORCH_CHECK(
      residual->scalar_type() == input.scalar_type(), "bnext: residual dtype ",
      residual->scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(
      residual->device() == input.device(),
      "Expected all tensors to be on the same device, but found input on ",
      input.device(), " and residual on ", residual->device());
}

void check_memory_saving_activation(std::string_view activation, double negative_slope) {
  TORCH_CHECK_VALUE(
      act_invertible(parse_activation(activation), negative_slope),
      "bnext: memory_saving=True recovers the normalized input from the "
      "output, so it needs an invertible activation (identity, elu, or "
      "leaky_relu with negative_slope > 0); got '", std::string(activation),
      "' with negative_slope=", negative_slope);
}

void check_memory_saving(
    std::string_view activation,
    double negative_slope,
    const std::optional<at::Tensor>& weight) {
  check_memory_saving_activation(activation, negative_slope);
  const bool has_weight = weight.has_value() && weight->defined();
  TORCH_CHECK_VALUE(
      !has_weight || !at::eq(*weight, 0).any().item<bool>(),
      "bnext: memory_saving=True cannot recover x_hat = (y - bias) / weight "
      "in a channel whose weight is 0; use memory_saving=False for this "
      "layer (e.g. zero-initialised residual-branch weights)");
}

namespace {

void check_channel_tensor(
    const at::Tensor& input, const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(
      t.numel() == numel, name, " should contain ", numel, " elements not ", t.numel());
  TORCH_CHECK(
      t.device() == input.device(),
      "Expected all tensors to be on the same device, but found input on ",
      input.device(), " and ", name, " on ", t.device());
  TORCH_CHECK(
      at::isFloatingType(t.scalar_type()), name, " must be floating, got ", t.scalar_type());
}

}  // namespace

void check_moments(const at::Tensor& moments) {
  TORCH_CHECK(
      moments.dim() == 3 && moments.size(1) == 3 && moments.scalar_type() == at::kDouble,
      "batch_norm_merge_moments: expected a (K, 3, C) float64 stack of (count, mean, M2), "
      "got ", moments.sizes(), " ", moments.scalar_type());
}

void check_elemt_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const std::optional<at::Tensor>& residual) {
  check_batch_norm_args(input, weight, bias, std::nullopt, std::nullopt);
  const int64_t C = input.size(1);
  check_channel_tensor(input, mean, C, "mean");
  check_channel_tensor(input, invstd, C, "invstd");
  check_residual(input, residual);
}

void check_backward_reduce_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const std::optional<at::Tensor>& residual,
    bool want_grad_residual) {
  check_elemt_args(input, weight, bias, mean, invstd, residual);
  check_grad_output(grad_output, input);
  TORCH_CHECK(
      (residual.has_value() && residual->defined()) || !want_grad_residual,
      "batch_norm_backward_reduce: grad_residual requested without a residual");
}

void check_backward_elemt_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& grad_residual,
    const at::Tensor& sums,
    const at::Tensor& count) {
  check_elemt_args(input, weight, bias, mean, invstd, residual);
  check_grad_output(grad_output, input);
  const int64_t C = input.size(1);
  check_channel_tensor(input, sums, 2 * C, "sums");
  check_channel_tensor(input, count, C, "count");
  const bool has_residual = residual.has_value() && residual->defined();
  const bool has_g = grad_residual.has_value() && grad_residual->defined();
  TORCH_CHECK(
      !has_residual || (has_g && grad_residual->sizes() == input.sizes() &&
                        grad_residual->scalar_type() == input.scalar_type()),
      "batch_norm_backward_elemt: with a residual, grad_residual (g from "
      "batch_norm_backward_reduce) must be given, with the input's size and dtype");
}

}  // namespace bnext
