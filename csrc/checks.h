// Argument validation shared by every backend. Error types follow torch's
// batch_norm: ValueError for shape/eps misuse, RuntimeError for mismatched
// parameters, NotImplementedError for non-floating dtypes.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "activation_kind.h"

namespace bnext {

// Validates input against the per-channel tensors that are present. Throws
// before any kernel runs, so a rejected call mutates nothing.
void check_batch_norm_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var);

// torch.nn.functional.batch_norm's validation of a whole call, in torch's
// order and with its error types: the one place a call is checked before
// anything (num_batches_tracked, the running statistics) is mutated. An input
// without elements gets torch's rule: only eps is checked (see
// empty_batch_output). num_batches_tracked, when given, has one element.
void check_batch_norm_call(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked,
    bool training,
    double eps);

// torch's result for an input without elements (any rank, 1-D included):
// an empty output of the input's shape, dtype and output memory format; a
// given weight or bias must have an element 0 (torch reads weight[0] and
// bias[0]: IndexError otherwise). No statistic is computed or updated.
at::Tensor empty_batch_output(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias);

// eps as torch's batch_norm accepts it: > 0 in training (the variance may
// be 0), >= 0 with given statistics. ValueError otherwise.
void check_eps(double eps, bool training);

// Memory format of the outputs, following torch's CPU batch norm: a 4-D/5-D
// input dense as contiguous or channels_last(_3d) keeps that format, other
// 4-D/5-D strides use suggest_memory_format(), lower ranks are contiguous.
at::MemoryFormat output_memory_format(const at::Tensor& input);

// Accumulation dtype: float64 for float64 input, float32 otherwise.
at::ScalarType acc_dtype(at::ScalarType input_dtype);

// A backward's grad_output: the input's sizes and dtype (RuntimeError).
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input);

// update_running_stats: C-element buffers and statistics, running buffers
// sharing a dtype and the statistics' device; with momentum None, a
// one-element num_batches_tracked (RuntimeError).
void check_update_running_args(
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const at::Tensor& save_mean,
    const at::Tensor& unbiased_var,
    std::optional<double> momentum,
    const std::optional<at::Tensor>& num_batches_tracked);

// What a backward normalizes with must be given: save_mean/save_invstd when
// train, running_mean/running_var otherwise (RuntimeError).
void check_backward_statistics(
    bool train,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& save_mean,
    const std::optional<at::Tensor>& save_invstd,
    const char* op_name);

// A fused op's residual: the input's sizes, dtype and device (RuntimeError).
void check_residual(const at::Tensor& input, const std::optional<at::Tensor>& residual);

// memory_saving recovers x_hat from the output, so it needs an invertible
// activation (ValueError). Every backend checks this on the host.
void check_memory_saving_activation(std::string_view activation, double negative_slope);

// The same, and no zero weight (ValueError). The weight is read on the host,
// so only the CPU ops call this; the CUDA ops check the weight in their
// kernels instead (no synchronisation, graph-capturable).
void check_memory_saving(
    std::string_view activation,
    double negative_slope,
    const std::optional<at::Tensor>& weight);

// Phase ops: moments are a (K, 3, C) float64 stack of (count, mean, M2)
// rows (RuntimeError otherwise).
void check_moments(const at::Tensor& moments);

// The phase ops' arguments, for every backend: those of the single-device
// ops (input, parameters, residual, grad_output), given mean and invstd with
// C elements on the input's device, floating (RuntimeError).
void check_elemt_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const std::optional<at::Tensor>& residual);
// And grad_residual only with a residual.
void check_backward_reduce_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const std::optional<at::Tensor>& residual,
    bool want_grad_residual);
// And sums (2, C) and count (C,); with a residual, grad_residual (the first
// pass's g) of the input's size and dtype.
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
    const at::Tensor& count);

}  // namespace bnext
