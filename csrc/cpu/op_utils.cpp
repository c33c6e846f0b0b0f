#include "op_utils.h"

#include <c10/util/Exception.h>

#include "../checks.h"
#include "kernels.h"

namespace bnext::cpu {

TrainNormalization train_normalization(
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  const int64_t C = x.size(1);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  auto [mean, var] = batch_stats(x);
  at::Tensor invstd = invstd_from_var(var, eps);
  at::Tensor unbiased = unbiased_from_biased(var, per_channel_count(x));
  NormalizeCoeffs k = normalize_coeffs(
      mean, invstd, channel_param(weight, C, acc, 1.0), channel_param(bias, C, acc, 0.0), acc);
  return {mean, invstd, unbiased, k};
}

NormalizeCoeffs eval_normalization(
    const at::Tensor& input,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  const int64_t C = input.size(1);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const at::Tensor invstd = invstd_from_var(channel_param(running_var, C, acc, 1.0), eps);
  return normalize_coeffs(
      channel_param(running_mean, C, at::kDouble, 0.0), invstd,
      channel_param(weight, C, acc, 1.0), channel_param(bias, C, acc, 0.0), acc);
}

std::pair<at::Tensor, at::Tensor> backward_statistics(
    const at::Tensor& input,
    bool train,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean,
    const std::optional<at::Tensor>& save_invstd,
    double eps,
    const char* op_name) {
  const int64_t C = input.size(1);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  check_backward_statistics(train, running_mean, running_var, save_mean, save_invstd, op_name);
  if (train) {
    return {channel_param(save_mean, C, at::kDouble, 0.0), channel_param(save_invstd, C, acc, 1.0)};
  }
  return {channel_param(running_mean, C, at::kDouble, 0.0),
          invstd_from_var(channel_param(running_var, C, acc, 1.0), eps)};
}

}  // namespace bnext::cpu
