"""autograd.Functions that the functional API and the modules call.

The ops also carry ``register_autograd`` formulas (``_ops.py``) for direct
callers, but torch 2.13 builds those as legacy ``autograd.Function``s without
``setup_context``, which torch.func (grad, vjp, jacrev, vmap of grad) refuses.
These new-style Functions give the same first derivatives through the same
kernels, plus:

* ``setup_context`` and ``generate_vmap_rule``, so torch.func transforms work;
* a backward that is itself differentiable (``_BackwardFn``), so double
  backward works, with the second derivatives in ``_double_backward.py``.

Inside ``forward`` grad mode is off, so the ops run their kernels directly.
"""

import torch

from ._double_backward import double_backward
from ._ops import ops


def _cast_like(grad, param):
    # grad_bias comes back in the weight's dtype (or the statistics dtype when
    # there is no weight); a bias-only call may hold the bias in another dtype.
    if grad is None or param is None or grad.dtype == param.dtype:
        return grad
    return grad.to(param.dtype)


class _BackwardFn(torch.autograd.Function):
    """``bnext::batch_norm_backward`` with a VJP of its own."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, input, weight, running_mean, running_var,
                save_mean, save_invstd, train, eps, mask0, mask1, mask2):
        return ops.batch_norm_backward(
            grad_output, input, weight, running_mean, running_var,
            save_mean, save_invstd, train, eps, [mask0, mask1, mask2],
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, weight, running_mean, running_var, _, _, train, eps = inputs[:9]
        ctx.save_for_backward(grad_output, input, weight, running_mean, running_var)
        ctx.train = train
        ctx.eps = eps

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        grad_output, input, weight, running_mean, running_var = ctx.saved_tensors
        d_g, d_x, d_w = double_backward(
            ggx, ggw, ggb, grad_output, input, weight, running_mean, running_var,
            ctx.train, ctx.eps, ctx.needs_input_grad[:3],
        )
        return d_g, d_x, d_w, None, None, None, None, None, None, None, None, None


def _first_backward(grad_output, input, weight, bias, running_mean, running_var,
                    save_mean, save_invstd, train, eps, needs):
    grad_input, grad_weight, grad_bias = _BackwardFn.apply(
        grad_output, input, weight, running_mean, running_var, save_mean,
        save_invstd, train, eps, needs[0], needs[1], needs[2],
    )
    return grad_input, grad_weight, _cast_like(grad_bias, bias)


class BatchNormTrainFn(torch.autograd.Function):
    """Training forward: returns ``(output, save_mean, save_invstd,
    unbiased_var)``; only ``output`` is differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, eps):
        return ops.batch_norm_train(input, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, eps = inputs
        _, save_mean, save_invstd, unbiased_var = output
        ctx.mark_non_differentiable(save_mean, save_invstd, unbiased_var)
        ctx.save_for_backward(input, weight, bias, save_mean, save_invstd)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd, _grad_var):
        input, weight, bias, save_mean, save_invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = _first_backward(grad_output, input, weight, bias, None, None,
                                save_mean, save_invstd, True, ctx.eps,
                                (needs[0], needs[1], needs[2]))
        return (*grads, None)


class BatchNormEvalFn(torch.autograd.Function):
    """Eval forward with the running statistics; they get no gradient, as in
    torch's batch norm."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, running_mean, running_var, weight, bias, eps):
        return ops.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, running_mean, running_var, weight, bias, eps = inputs
        ctx.save_for_backward(input, running_mean, running_var, weight, bias)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_output):
        input, running_mean, running_var, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_input, grad_weight, grad_bias = _first_backward(
            grad_output, input, weight, bias, running_mean, running_var, None, None,
            False, ctx.eps, (needs[0], needs[3], needs[4]))
        return grad_input, None, None, grad_weight, grad_bias, None
