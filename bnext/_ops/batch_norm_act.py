"""The fused batch-norm + activation family: ``batch_norm_act_train``,
``batch_norm_act_eval``, ``batch_norm_act_backward`` and
``batch_norm_act_train_step``: fake kernels and autograd formulas.

The activation names are those of ``activations.py`` (the table in
``csrc/activation_kind.h``).

What is saved for backward is the point of these ops:

* default: the input (plus the residual, when there is one: the pre-
  activation is recomputed from both) and per-channel statistics;
* ``memory_saving``: the *output* (plus the residual), from which backward
  inverts the activation to recover ``x_hat``. The next layer keeps that
  output anyway, so the BN input can be freed.

First derivatives only: a double backward through these ops raises.
"""

import torch

from .batch_norm import _batch_norm_train_fake
from .common import acc_dtype, cast_like, empty_like_output, empty_stat, ops, same_device

# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake("bnext::batch_norm_act_train_step")
def _batch_norm_act_train_step_fake(input, weight, bias, residual, running_mean, running_var,
                                    num_batches_tracked, momentum, eps, activation,
                                    negative_slope, memory_saving):
    same_device(input, weight=weight, bias=bias, residual=residual, running_mean=running_mean,
                 running_var=running_var)
    return empty_like_output(input)


@torch.library.register_fake("bnext::batch_norm_act_train")
def _batch_norm_act_train_fake(input, weight, bias, residual, eps, activation,
                               negative_slope, memory_saving):
    return _batch_norm_train_fake(input, weight, bias, eps)


@torch.library.register_fake("bnext::batch_norm_act_eval")
def _batch_norm_act_eval_fake(input, running_mean, running_var, weight, bias, residual,
                              eps, activation, negative_slope, memory_saving):
    same_device(input, weight=weight, bias=bias, residual=residual, running_mean=running_mean,
                 running_var=running_var)
    return empty_like_output(input)


@torch.library.register_fake("bnext::batch_norm_act_backward")
def _batch_norm_act_backward_fake(grad_output, saved, saved_is_output, weight, bias,
                                  residual, running_mean, running_var, save_mean,
                                  save_invstd, train, eps, activation, negative_slope,
                                  output_mask):
    param_dtype = weight.dtype if weight is not None else acc_dtype(saved.dtype)
    return (
        empty_like_output(saved) if output_mask[0] else None,
        empty_like_output(saved) if output_mask[1] else None,
        empty_stat(saved, param_dtype) if output_mask[2] else None,
        empty_stat(saved, param_dtype) if output_mask[3] else None,
    )


# -------------------------------------------------------------------- autograd


def _check_first_order(grad_output, saved):
    if torch.is_grad_enabled() and (grad_output.requires_grad or saved.requires_grad):
        raise NotImplementedError(
            "bnext: double backward through the fused BatchNormAct ops is not "
            "implemented; use bnext.BatchNorm*d followed by the activation"
        )


def _train_setup_context(ctx, inputs, output):
    input, weight, bias, residual, eps, activation, negative_slope, memory_saving = inputs
    out, save_mean, save_invstd, unbiased_var = output
    ctx.mark_non_differentiable(save_mean, save_invstd, unbiased_var)
    saved = out if memory_saving else input
    ctx.save_for_backward(saved, weight, bias, residual, save_mean, save_invstd)
    ctx.args = (eps, activation, negative_slope, memory_saving)


def _train_backward(ctx, grad_output, _gm, _gi, _gv):
    saved, weight, bias, residual, save_mean, save_invstd = ctx.saved_tensors
    eps, activation, negative_slope, memory_saving = ctx.args
    _check_first_order(grad_output, saved)
    needs = ctx.needs_input_grad
    gi, gr, gw, gb = ops.batch_norm_act_backward(
        grad_output, saved, memory_saving, weight, bias, residual, None, None,
        save_mean, save_invstd, True, eps, activation, negative_slope,
        [needs[0], needs[3] and residual is not None, needs[1] and weight is not None,
         needs[2] and bias is not None],
    )
    return gi, gw, cast_like(gb, bias), gr, None, None, None, None


def _eval_setup_context(ctx, inputs, output):
    (input, running_mean, running_var, weight, bias, residual, eps, activation,
     negative_slope, memory_saving) = inputs
    saved = output if memory_saving else input
    ctx.save_for_backward(saved, running_mean, running_var, weight, bias, residual)
    ctx.args = (eps, activation, negative_slope, memory_saving)


def _eval_backward(ctx, grad_output):
    saved, running_mean, running_var, weight, bias, residual = ctx.saved_tensors
    eps, activation, negative_slope, memory_saving = ctx.args
    _check_first_order(grad_output, saved)
    needs = ctx.needs_input_grad
    gi, gr, gw, gb = ops.batch_norm_act_backward(
        grad_output, saved, memory_saving, weight, bias, residual, running_mean,
        running_var, None, None, False, eps, activation, negative_slope,
        [needs[0], needs[5] and residual is not None, needs[3] and weight is not None,
         needs[4] and bias is not None],
    )
    # Like torch's batch norm, the running statistics get no gradient.
    return gi, None, None, gw, cast_like(gb, bias), gr, None, None, None, None


torch.library.register_autograd(
    "bnext::batch_norm_act_train", _train_backward, setup_context=_train_setup_context
)
torch.library.register_autograd(
    "bnext::batch_norm_act_eval", _eval_backward, setup_context=_eval_setup_context
)
