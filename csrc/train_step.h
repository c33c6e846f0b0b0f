// The training call behind batch_norm_train_step / batch_norm_act_train_step
// (csrc/ops.cpp), shared by their backend-independent kernel and their
// autograd kernel (which keeps save_mean and save_invstd for backward).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace bnext {

// (output, save_mean, save_invstd) after validation, the backend's training
// op, num_batches_tracked += 1 and the running-stat update, in that order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_step(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked,
    std::optional<double> momentum,
    double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> act_train_step(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked,
    std::optional<double> momentum,
    double eps,
    c10::string_view activation,
    double negative_slope,
    bool memory_saving);

}  // namespace bnext
