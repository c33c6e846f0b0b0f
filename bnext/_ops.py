"""Loads the compiled ops and registers what torch.compile and autograd need.

Every op is declared once in ``csrc/ops.cpp``. This module adds, per op:

* a fake (meta) kernel, whose output sizes, strides, dtypes and devices equal
  the real kernels' (checked by ``torch.library.opcheck`` in the tests);
* for the two differentiable forward ops, an autograd formula that runs
  ``bnext::batch_norm_backward``.

``update_running_stats`` mutates its inputs and therefore gets no autograd
formula (torch.library refuses one); its inputs are non-differentiable
statistics, so none is needed.
"""

import torch
from torch._prims_common import suggest_memory_format

from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)

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


@torch.library.register_fake("bnext::batch_norm_eval")
def _batch_norm_eval_fake(input, running_mean, running_var, weight, bias, eps):
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


# -------------------------------------------------------------------- autograd


def _cast_like(grad, param):
    # grad_bias comes back in the weight's dtype (or the statistics dtype when
    # there is no weight); a bias-only call may hold the bias in another dtype.
    if grad is None or param is None or grad.dtype == param.dtype:
        return grad
    return grad.to(param.dtype)


def _train_setup_context(ctx, inputs, output):
    input, weight, bias, eps = inputs
    _, save_mean, save_invstd, unbiased_var = output
    ctx.mark_non_differentiable(save_mean, save_invstd, unbiased_var)
    ctx.save_for_backward(input, weight, bias, save_mean, save_invstd)
    ctx.eps = eps


def _train_backward(ctx, grad_output, _grad_mean, _grad_invstd, _grad_var):
    input, weight, bias, save_mean, save_invstd = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    grad_input, grad_weight, grad_bias = ops.batch_norm_backward(
        grad_output, input, weight, None, None, save_mean, save_invstd, True, ctx.eps, mask
    )
    return grad_input, grad_weight, _cast_like(grad_bias, bias), None


def _eval_setup_context(ctx, inputs, output):
    input, running_mean, running_var, weight, bias, eps = inputs
    ctx.save_for_backward(input, running_mean, running_var, weight, bias)
    ctx.eps = eps


def _eval_backward(ctx, grad_output):
    input, running_mean, running_var, weight, bias = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]]
    grad_input, grad_weight, grad_bias = ops.batch_norm_backward(
        grad_output, input, weight, running_mean, running_var, None, None, False, ctx.eps, mask
    )
    # Like torch's batch norm, the running statistics get no gradient.
    return grad_input, None, None, grad_weight, _cast_like(grad_bias, bias), None


torch.library.register_autograd(
    "bnext::batch_norm_train", _train_backward, setup_context=_train_setup_context
)
torch.library.register_autograd(
    "bnext::batch_norm_eval", _eval_backward, setup_context=_eval_setup_context
)
