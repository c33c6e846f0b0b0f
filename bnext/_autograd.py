"""Autograd for bnext's ops: first and second derivatives, and torch.func.

* The two forward ops have C++ autograd kernels (``csrc/autograd.cpp``): the
  path of ordinary eager calls, torch.compile and torch.export.
* ``batch_norm_backward`` gets a ``torch.library.register_autograd`` formula,
  the closed-form VJP in ``_double_backward.py`` (also ``_BackwardFn``'s):
  double backward (and higher, through autograd of that formula) works.
* torch 2.13 builds register_autograd formulas as legacy autograd.Functions
  without ``setup_context``, which torch.func transforms (grad, vjp, jacrev,
  vmap over grad) refuse. ``BatchNormTrainFn``/``BatchNormEvalFn`` are the
  same derivatives as new-style Functions; ``train_forward``/``eval_forward``
  use them only while a torch.func transform is active, because
  ``autograd.Function.apply`` costs more per call than the C++ node.

``update_running_stats`` mutates its inputs, so torch.library refuses an
autograd formula for it; its inputs are statistics and need none.
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
    args = (grad_output, input, weight, running_mean, running_var, save_mean,
            save_invstd, train, eps)
    if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
        # create_graph=True or a torch.func transform: record a differentiable node.
        grads = _BackwardFn.apply(*args, needs[0], needs[1], needs[2])
    else:
        grads = ops.batch_norm_backward(*args, list(needs))
    grad_input, grad_weight, grad_bias = grads
    return grad_input, grad_weight, _cast_like(grad_bias, bias)


def _train_setup_context(ctx, inputs, output):
    input, weight, bias, eps = inputs
    _, save_mean, save_invstd, unbiased_var = output
    ctx.mark_non_differentiable(save_mean, save_invstd, unbiased_var)
    ctx.save_for_backward(input, weight, bias, save_mean, save_invstd)
    ctx.eps = eps


def _train_backward(ctx, grad_output, _grad_mean, _grad_invstd, _grad_var):
    input, weight, bias, save_mean, save_invstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = _first_backward(grad_output, input, weight, bias, None, None,
                            save_mean, save_invstd, True, ctx.eps,
                            (needs[0], needs[1], needs[2]))
    return (*grads, None)


def _eval_setup_context(ctx, inputs, output):
    input, running_mean, running_var, weight, bias, eps = inputs
    ctx.save_for_backward(input, running_mean, running_var, weight, bias)
    ctx.eps = eps


def _eval_backward(ctx, grad_output):
    input, running_mean, running_var, weight, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_input, grad_weight, grad_bias = _first_backward(
        grad_output, input, weight, bias, running_mean, running_var, None, None,
        False, ctx.eps, (needs[0], needs[3], needs[4]))
    # Like torch's batch norm, the running statistics get no gradient.
    return grad_input, None, None, grad_weight, grad_bias, None


def _backward_setup_context(ctx, inputs, output):
    grad_output, input, weight, running_mean, running_var, _, _, train, eps, _ = inputs
    ctx.save_for_backward(grad_output, input, weight, running_mean, running_var)
    ctx.train = train
    ctx.eps = eps


def _backward_backward(ctx, ggx, ggw, ggb):
    return (*_BackwardFn.backward(ctx, ggx, ggw, ggb)[:3],) + (None,) * 7


# The forward ops' autograd is C++ (csrc/autograd.cpp, ~20 us less per
# call than a Python formula); when it records a graph (create_graph), its
# backward calls batch_norm_backward through this formula.
torch.library.register_autograd(
    "bnext::batch_norm_backward", _backward_backward, setup_context=_backward_setup_context
)


class BatchNormTrainFn(torch.autograd.Function):
    """Training forward: returns ``(output, save_mean, save_invstd,
    unbiased_var)``; only ``output`` is differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, eps):
        return ops.batch_norm_train(input, weight, bias, eps)

    setup_context = staticmethod(_train_setup_context)
    backward = staticmethod(_train_backward)


class BatchNormEvalFn(torch.autograd.Function):
    """Eval forward with the running statistics; they get no gradient, as in
    torch's batch norm."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, running_mean, running_var, weight, bias, eps):
        return ops.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)

    setup_context = staticmethod(_eval_setup_context)
    backward = staticmethod(_eval_backward)


def train_forward(input, weight, bias, eps):
    """``bnext::batch_norm_train`` with autograd that torch.func accepts."""
    if torch._C._are_functorch_transforms_active():
        return BatchNormTrainFn.apply(input, weight, bias, eps)
    return ops.batch_norm_train(input, weight, bias, eps)


def eval_forward(input, running_mean, running_var, weight, bias, eps):
    """``bnext::batch_norm_eval`` with autograd that torch.func accepts."""
    if torch._C._are_functorch_transforms_active():
        return BatchNormEvalFn.apply(input, running_mean, running_var, weight, bias, eps)
    return ops.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
