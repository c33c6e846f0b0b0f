"""Autograd formulas for the fused BatchNorm + activation ops.

What is saved for backward is the point of these ops:

* default: the input (plus the residual, when there is one: the pre-
  activation is recomputed from both) and per-channel statistics;
* ``memory_saving``: the *output* (plus the residual), from which backward
  inverts the activation to recover ``x_hat``. The next layer keeps that
  output anyway, so the BN input can be freed.

First derivatives only: a double backward through these ops raises.
"""

import torch

from ._autograd import _cast_like
from ._ops import ops


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
    return gi, gw, _cast_like(gb, bias), gr, None, None, None, None


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
    return gi, None, None, gw, _cast_like(gb, bias), gr, None, None, None, None


torch.library.register_autograd(
    "bnext::batch_norm_act_train", _train_backward, setup_context=_train_setup_context
)
torch.library.register_autograd(
    "bnext::batch_norm_act_eval", _eval_backward, setup_context=_eval_setup_context
)
