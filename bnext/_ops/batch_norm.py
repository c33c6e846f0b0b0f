"""The plain batch-norm family: ``batch_norm_train``, ``batch_norm_eval``,
``batch_norm_backward``, ``batch_norm_train_step``, ``update_running_stats``
and ``check_batch_norm_call``: fake kernels, autograd and batching rules.

Autograd: first and second derivatives, and torch.func.

* The two forward ops have C++ autograd kernels (``csrc/autograd.cpp``): the
  path of ordinary eager calls, torch.compile and torch.export.
* ``batch_norm_backward`` gets a ``torch.library.register_autograd`` formula,
  the closed-form VJP in ``double_backward.py`` (also ``_BackwardFn``'s):
  double backward (and higher, through autograd of that formula) works.
* torch 2.13 builds register_autograd formulas as legacy autograd.Functions
  without ``setup_context``, which torch.func transforms (grad, vjp, jacrev,
  vmap over grad) refuse. ``BatchNormTrainFn``/``BatchNormEvalFn`` are the
  same derivatives as new-style Functions; ``train_forward``/``eval_forward``
  use them only while a torch.func transform is active, because
  ``autograd.Function.apply`` costs more per call than the C++ node.

``update_running_stats`` mutates its inputs, so torch.library refuses an
autograd formula for it; its inputs are statistics and need none.

Batching rules (torch.vmap): like functorch's rule for ``aten::native_batch_norm``, a batch of B
independent problems on ``(N, C, *)`` is folded into one problem on
``(N, B*C, *)``: every (sample, channel) pair is its own channel, so one
kernel call computes all B results. Per-channel tensors fold to ``(B*C,)``.

``update_running_stats`` mutates its inputs, so it loops over B with views
(per-channel work only). Batched statistics into unbatched running buffers
raise the error torch's batch norm raises in that case.
"""

import torch

from .common import (acc_dtype, cast_like, empty_like_output, empty_stat, ops,
                     same_device)
from .double_backward import double_backward

# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake("bnext::batch_norm_train")
def _batch_norm_train_fake(input, weight, bias, eps):
    return (
        empty_like_output(input),
        empty_stat(input, torch.float64),  # save_mean: see csrc/ops.cpp
        empty_stat(input),
        empty_stat(input),
    )


@torch.library.register_fake("bnext::batch_norm_train_step")
def _batch_norm_train_step_fake(input, weight, bias, running_mean, running_var,
                                num_batches_tracked, momentum, eps):
    same_device(input, weight=weight, bias=bias, running_mean=running_mean,
                 running_var=running_var)
    return empty_like_output(input)


@torch.library.register_fake("bnext::check_batch_norm_call")
def _check_batch_norm_call_fake(input, weight, bias, running_mean, running_var,
                                num_batches_tracked, training, eps):
    return None


@torch.library.register_fake("bnext::batch_norm_eval")
def _batch_norm_eval_fake(input, running_mean, running_var, weight, bias, eps):
    same_device(input, weight=weight, bias=bias, running_mean=running_mean,
                 running_var=running_var)
    return empty_like_output(input)


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
        empty_like_output(input) if output_mask[0] else None,
        empty_stat(input, param_dtype) if output_mask[1] else None,
        empty_stat(input, param_dtype) if output_mask[2] else None,
    )


# -------------------------------------------------------------------- autograd




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
    return grad_input, grad_weight, cast_like(grad_bias, bias)


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


# -------------------------------------------------------------- batching rules


def _fold_input(x, bdim, B):
    if x is None:
        return None
    if bdim is None:
        x = x.unsqueeze(1).expand(x.shape[0], B, *x.shape[1:])
    else:
        x = x.movedim(bdim, 1)
    return x.reshape(x.shape[0], B * x.shape[2], *x.shape[3:])


def _fold_channel(t, bdim, B):
    if t is None:
        return None
    t = t.expand(B, *t.shape) if bdim is None else t.movedim(bdim, 0)
    return t.reshape(-1)


def _unfold_input(y, B):
    return y.reshape(y.shape[0], B, y.shape[1] // B, *y.shape[2:])


def _unfold_channel(t, B):
    return None if t is None else t.reshape(B, -1)


@torch.library.register_vmap("bnext::batch_norm_train")
def _train_vmap(info, in_dims, input, weight, bias, eps):
    B = info.batch_size
    out, save_mean, save_invstd, unbiased_var = ops.batch_norm_train(
        _fold_input(input, in_dims[0], B),
        _fold_channel(weight, in_dims[1], B),
        _fold_channel(bias, in_dims[2], B),
        eps,
    )
    stats = tuple(_unfold_channel(t, B) for t in (save_mean, save_invstd, unbiased_var))
    return (_unfold_input(out, B), *stats), (1, 0, 0, 0)


@torch.library.register_vmap("bnext::batch_norm_eval")
def _eval_vmap(info, in_dims, input, running_mean, running_var, weight, bias, eps):
    B = info.batch_size
    out = ops.batch_norm_eval(
        _fold_input(input, in_dims[0], B),
        *(_fold_channel(t, d, B) for t, d in zip(
            (running_mean, running_var, weight, bias), in_dims[1:5])),
        eps,
    )
    return _unfold_input(out, B), 1


@torch.library.register_vmap("bnext::batch_norm_backward")
def _backward_vmap(info, in_dims, grad_output, input, weight, running_mean,
                   running_var, save_mean, save_invstd, train, eps, output_mask):
    B = info.batch_size
    grads = ops.batch_norm_backward(
        _fold_input(grad_output, in_dims[0], B),
        _fold_input(input, in_dims[1], B),
        *(_fold_channel(t, d, B) for t, d in zip(
            (weight, running_mean, running_var, save_mean, save_invstd), in_dims[2:7])),
        train, eps, output_mask,
    )
    grad_input, grad_weight, grad_bias = grads
    outs = (
        None if grad_input is None else _unfold_input(grad_input, B),
        _unfold_channel(grad_weight, B),
        _unfold_channel(grad_bias, B),
    )
    return outs, tuple(None if o is None else (1 if i == 0 else 0) for i, o in enumerate(outs))


@torch.library.register_vmap("bnext::check_batch_norm_call")
def _check_vmap(info, in_dims, input, weight, bias, running_mean, running_var,
                num_batches_tracked, training, eps):
    # Every sample has the same shapes: checking the first checks them all.
    first = [t if t is None or d is None else t.select(d, 0)
             for t, d in zip((input, weight, bias, running_mean, running_var,
                              num_batches_tracked), in_dims)]
    ops.check_batch_norm_call(*first, training, eps)
    return None, None


@torch.library.register_vmap("bnext::update_running_stats")
def _update_vmap(info, in_dims, running_mean, running_var, save_mean, unbiased_var,
                 momentum, num_batches_tracked):
    if in_dims[0] is None or in_dims[1] is None:
        raise RuntimeError(
            "Batch norm got a batched tensor as input while the running_mean or "
            "running_var, which will be updated in place, were not batched. "
            "Use track_running_stats=False, or pass batched running buffers "
            "(for example through torch.func.functional_call)."
        )
    nbt_dim = in_dims[5]

    def pick(t, d, b):
        return t if t is None or d is None else t.select(d, b)

    for b in range(info.batch_size):
        ops.update_running_stats(
            running_mean.select(in_dims[0], b),
            running_var.select(in_dims[1], b),
            pick(save_mean, in_dims[2], b),
            pick(unbiased_var, in_dims[3], b),
            momentum,
            pick(num_batches_tracked, nbt_dim, b),
        )
    return None, None
