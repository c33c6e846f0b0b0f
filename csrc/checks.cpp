#include "checks.h"

#include <c10/util/Exception.h>

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
  const int64_t channels = input.size(1);
  TORCH_CHECK(
      t->numel() == channels, name, " should contain ", channels,
      " elements not ", t->numel());
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

}  // namespace bnext
