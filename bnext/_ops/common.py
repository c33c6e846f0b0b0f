"""What every op family's registrations share: the op namespace and the
output and statistics conventions of the C++ kernels."""

import torch
from torch._prims_common import suggest_memory_format

ops = torch.ops.bnext


def output_memory_format(input: torch.Tensor) -> torch.memory_format:
    """Memory format of bnext outputs: torch's CPU batch-norm rule (mirrors
    output_memory_format in csrc/checks.cpp)."""
    if input.dim() in (4, 5):
        if input.is_contiguous():
            return torch.contiguous_format
        cl = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
        if input.is_contiguous(memory_format=cl):
            return cl
        return suggest_memory_format(input)
    return torch.contiguous_format


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_like_output(input: torch.Tensor) -> torch.Tensor:
    return torch.empty(
        input.shape,
        dtype=input.dtype,
        device=input.device,
        memory_format=output_memory_format(input),
    )


def empty_stat(input: torch.Tensor, dtype=None) -> torch.Tensor:
    return input.new_empty((input.shape[1],), dtype=dtype or acc_dtype(input.dtype))

def same_device(input, **tensors):
    # A meta tensor beside real ones routes the call here (Meta outranks
    # CPU/CUDA in dispatch); the real kernels would raise this.
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found input on "
                f"{input.device} and {name} on {t.device}")


def cast_like(grad, param):
    """grad_bias comes back in the weight's dtype (or the statistics dtype when
    there is no weight); a bias-only call may hold the bias in another dtype."""
    if grad is None or param is None or grad.dtype == param.dtype:
        return grad
    return grad.to(param.dtype)
