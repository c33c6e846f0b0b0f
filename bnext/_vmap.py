"""Batching rules for torch.vmap over bnext's ops.

Like functorch's rule for ``aten::native_batch_norm``, a batch of B
independent problems on ``(N, C, *)`` is folded into one problem on
``(N, B*C, *)``: every (sample, channel) pair is its own channel, so one
kernel call computes all B results. Per-channel tensors fold to ``(B*C,)``.

``update_running_stats`` mutates its inputs, so it loops over B with views
(per-channel work only). Batched statistics into unbatched running buffers
raise the error torch's batch norm raises in that case.
"""

import torch

from ._ops import ops


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
