// Argument validation shared by every backend. Error types follow torch's
// batch_norm: ValueError for shape/eps misuse, RuntimeError for mismatched
// parameters, NotImplementedError for non-floating dtypes.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace bnext {

// Validates input against the per-channel tensors that are present. Throws
// before any kernel runs, so a rejected call mutates nothing.
void check_batch_norm_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var);

// eps as torch's batch_norm accepts it: > 0 in training (the variance may
// be 0), >= 0 with given statistics. ValueError otherwise.
void check_eps(double eps, bool training);

// Memory format of the outputs, following torch's CPU batch norm: a 4-D/5-D
// input dense as contiguous or channels_last(_3d) keeps that format, other
// 4-D/5-D strides use suggest_memory_format(), lower ranks are contiguous.
at::MemoryFormat output_memory_format(const at::Tensor& input);

// Accumulation dtype: float64 for float64 input, float32 otherwise.
at::ScalarType acc_dtype(at::ScalarType input_dtype);

}  // namespace bnext
