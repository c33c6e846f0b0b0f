"""Loads the compiled ops and registers what torch.compile and autograd need.

Every op is declared once in ``csrc/ops.cpp``. This module adds, per op:

a fake (meta) kernel, whose output sizes, strides, dtypes and devices equal
the real kernels' (checked by ``torch.library.opcheck`` in the tests).
Autograd formulas live in ``_autograd.py``, batching rules in ``_vmap.py``.
The phase ops have no autograd of their own: ``sync.py`` composes them
inside an autograd.Function whose backward is the phase ops themselves.
"""

import torch
from torch._prims_common import suggest_memory_format

from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
from . import _cpu_capability

_cpu_capability.load_best()  # the CPU kernels of this CPU's level

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


def _empty_like_output(input: torch.Tensor) -> torch.Tensor:
    return torch.empty(
        input.shape,
        dtype=input.dtype,
        device=input.device,
        memory_format=output_memory_format(input),
    )


def _empty_stat(input: torch.Tensor, dtype=None) -> torch.Tensor:
    return input.new_empty((input.shape[1],), dtype=dtype or acc_dtype(input.dtype))


# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake("bnext::batch_norm_train")
def _batch_norm_train_fake(input, weight, bias, eps):
    return (
        _empty_like_output(input),
        _empty_stat(input, torch.float64),  # save_mean: see csrc/ops.cpp
        _empty_stat(input),
        _empty_stat(input),
    )


def _same_device(input, **tensors):
    # A meta tensor beside real ones routes the call here (Meta outranks
    # CPU/CUDA in dispatch); the real kernels would raise this.
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found input on "
                f"{input.device} and {name} on {t.device}")


@torch.library.register_fake("bnext::batch_norm_train_step")
def _batch_norm_train_step_fake(input, weight, bias, running_mean, running_var,
                                num_batches_tracked, momentum, eps):
    _same_device(input, weight=weight, bias=bias, running_mean=running_mean,
                 running_var=running_var)
    return _empty_like_output(input)


@torch.library.register_fake("bnext::batch_norm_act_train_step")
def _batch_norm_act_train_step_fake(input, weight, bias, residual, running_mean, running_var,
                                    num_batches_tracked, momentum, eps, activation,
                                    negative_slope, memory_saving):
    _same_device(input, weight=weight, bias=bias, residual=residual, running_mean=running_mean,
                 running_var=running_var)
    return _empty_like_output(input)


@torch.library.register_fake("bnext::check_batch_norm_call")
def _check_batch_norm_call_fake(input, weight, bias, running_mean, running_var,
                                num_batches_tracked, training, eps):
    return None


@torch.library.register_fake("bnext::batch_norm_eval")
def _batch_norm_eval_fake(input, running_mean, running_var, weight, bias, eps):
    _same_device(input, weight=weight, bias=bias, running_mean=running_mean,
                 running_var=running_var)
    return _empty_like_output(input)


@torch.library.register_fake("bnext::update_running_stats")
def _update_running_stats_fake(
    running_mean, running_var, save_mean, unbiased_var, momentum, num_batches_tracked
):
    return None


@torch.library.register_fake("bnext::batch_norm_backward")
def _batch_norm_backward_fake(
    grad_output,
    input,
    weight,
    running_mean,
    running_var,
    save_mean,
    save_invstd,
    train,
    eps,
    output_mask,
):
    param_dtype = weight.dtype if weight is not None else acc_dtype(input.dtype)
    return (
        _empty_like_output(input) if output_mask[0] else None,
        _empty_stat(input, param_dtype) if output_mask[1] else None,
        _empty_stat(input, param_dtype) if output_mask[2] else None,
    )


@torch.library.register_fake("bnext::batch_norm_act_train")
def _batch_norm_act_train_fake(input, weight, bias, residual, eps, activation,
                               negative_slope, memory_saving):
    return _batch_norm_train_fake(input, weight, bias, eps)


@torch.library.register_fake("bnext::batch_norm_act_eval")
def _batch_norm_act_eval_fake(input, running_mean, running_var, weight, bias, residual,
                              eps, activation, negative_slope, memory_saving):
    _same_device(input, weight=weight, bias=bias, residual=residual, running_mean=running_mean,
                 running_var=running_var)
    return _empty_like_output(input)


@torch.library.register_fake("bnext::batch_norm_act_backward")
def _batch_norm_act_backward_fake(grad_output, saved, saved_is_output, weight, bias,
                                  residual, running_mean, running_var, save_mean,
                                  save_invstd, train, eps, activation, negative_slope,
                                  output_mask):
    param_dtype = weight.dtype if weight is not None else acc_dtype(saved.dtype)
    return (
        _empty_like_output(saved) if output_mask[0] else None,
        _empty_like_output(saved) if output_mask[1] else None,
        _empty_stat(saved, param_dtype) if output_mask[2] else None,
        _empty_stat(saved, param_dtype) if output_mask[3] else None,
    )


# ------------------------------------------------- phase ops (SyncBatchNorm)


@torch.library.register_fake("bnext::batch_norm_moments")
def _batch_norm_moments_fake(input):
    return input.new_empty((3, input.shape[1]), dtype=torch.float64)


@torch.library.register_fake("bnext::batch_norm_merge_moments")
def _batch_norm_merge_moments_fake(moments, eps):
    C = moments.shape[2]
    return tuple(moments.new_empty((C,)) for _ in range(4))


@torch.library.register_fake("bnext::batch_norm_elemt")
def _batch_norm_elemt_fake(input, weight, bias, mean, invstd, residual, activation,
                           negative_slope):
    return _empty_like_output(input)


@torch.library.register_fake("bnext::batch_norm_backward_reduce")
def _batch_norm_backward_reduce_fake(grad_output, input, mean, invstd, weight, bias,
                                     residual, activation, negative_slope, output_mask):
    param_dtype = weight.dtype if weight is not None else acc_dtype(input.dtype)
    return (
        input.new_empty((2, input.shape[1]), dtype=torch.float64),
        _empty_stat(input, param_dtype) if output_mask[0] else None,
        _empty_stat(input, param_dtype) if output_mask[1] else None,
        _empty_like_output(input) if output_mask[2] else None,
    )


@torch.library.register_fake("bnext::batch_norm_backward_elemt")
def _batch_norm_backward_elemt_fake(grad_output, input, mean, invstd, weight, bias, residual,
                                    grad_residual, sums, count, activation, negative_slope):
    return _empty_like_output(input)
