#include "op_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/from_blob.h>
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
    double eps,
    EvalScratch& scratch) {
  const int64_t C = input.size(1);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  // Running statistics and parameters are in the acc dtype (checked), so
  // these are views, not copies.
  const at::Tensor mean = channel_param(running_mean, C, acc, 0.0);
  const at::Tensor var = channel_param(running_var, C, acc, 1.0);
  const at::Tensor w = channel_param(weight, C, acc, 1.0);
  const at::Tensor b = channel_param(bias, C, acc, 0.0);
  const auto opts = at::TensorOptions().dtype(acc);
  const bool on_stack = C <= EvalScratch::kChannels;
  NormalizeCoeffs out{mean,
                      on_stack ? at::from_blob(scratch.alpha, {C}, opts) : at::empty({C}, opts),
                      on_stack ? at::from_blob(scratch.beta, {C}, opts) : at::empty({C}, opts)};
  // invstd_from_var and normalize_coeffs per channel, without their
  // tensors. mean_hi is running_mean: T(double(m)) == m.
  AT_DISPATCH_FLOATING_TYPES(acc, "bnext_eval_coeffs", [&] {
    const scalar_t* m = mean.const_data_ptr<scalar_t>();
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* alpha = out.alpha.mutable_data_ptr<scalar_t>();
    scalar_t* beta = out.beta.mutable_data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    for (int64_t c = 0; c < C; ++c) {
      const ChannelNormalize<scalar_t> k =
          channel_normalize(static_cast<double>(m[c]), invstd_of(v[c], e), pw[c], pb[c]);
      alpha[c] = k.alpha;
      beta[c] = k.beta;
    }
  });
  return out;
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
