"""SyncBatchNorm over torch.distributed, on any backend (gloo included).

Training statistics are those of the global batch: each rank computes its
per-channel (count, mean, M2) with bnext's kernel, one all_gather exchanges
them, and every rank merges them count-weighted (Chan et al.), never through
E[x^2] - E[x]^2. Backward all-reduces the two per-channel sums of the input
gradient in one collective. Semantics follow torch.nn.SyncBatchNorm.
"""

import torch
import torch.distributed as dist

from ._checks import check_batch_norm_args
from ._moments import local_moments, merge
from ._ops import acc_dtype, ops
from .modules import _BatchNormForward

__all__ = ["SyncBatchNorm"]


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                eps, momentum, group, world_size):
        local = local_moments(input)
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local, group=group)
        n, mean, m2 = merge(torch.stack(parts))  # n: (C,) float64, equal entries
        # The check reads the count on the host: free on CPU; on CUDA it is
        # skipped so that the step has no host synchronisation.
        if input.device.type == "cpu" and n.numel() and n[0].item() <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got "
                f"{int(n[0].item())} values over all ranks"
            )
        acc = acc_dtype(input.dtype)
        var = m2 / n
        output = ops.batch_norm_eval(input, mean.to(acc), var.to(acc), weight, bias, eps)
        if running_mean is not None:
            # Counted only once the call is known to succeed (as bnext's BN).
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            ops.update_running_stats(running_mean, running_var, mean, (m2 / (n - 1)).to(acc),
                                     momentum, num_batches_tracked if momentum is None else None)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.n, ctx.eps, ctx.group = n, eps, group
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        acc = acc_dtype(input.dtype)
        # Local sum(dy) and sum(dy * x_hat) against the global statistics:
        # bnext's backward, given save_mean (float64, subtracted exactly) and
        # save_invstd, returns exactly these as grad_bias and grad_weight.
        _, sum_dy_xhat, sum_dy = ops.batch_norm_backward(
            grad_output, input, None, None, None, mean, invstd.to(acc), True, ctx.eps,
            [False, True, True])
        grad_weight = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.stack([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            grad_input = _grad_input(grad_output, input, weight, mean, invstd,
                                     sums[0], sums[1], ctx.n)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _grad_input(dy, x, weight, mean, invstd, sum_dy, sum_dy_xhat, n):
    # dx = w*r*(dy - sum_dy/n - x_hat*sum_dy_xhat/n), x_hat = (x - mean)*r,
    # rearranged to dy*a + (x - mean_hi)*b + c per channel. Coefficients in
    # float64; mean_hi is the mean rounded to the input's accumulation dtype
    # and its rounding error is folded into c, so x - mean_hi stays exact
    # even when |mean| >> std.
    acc = acc_dtype(x.dtype)
    r = invstd
    w = r if weight is None else weight.to(torch.float64) * r
    a = w
    b = -w * r * sum_dy_xhat.to(torch.float64) / n
    mean_hi = mean.to(acc)
    c = -w * sum_dy.to(torch.float64) / n + b * (mean_hi.to(torch.float64) - mean)
    shape = [1, -1] + [1] * (x.dim() - 2)
    a, b, c = (t.to(acc).view(shape) for t in (a, b, c))
    # One temporary, updated in place (each extra full-size temporary costs
    # an allocation and a pass).
    out = x.to(acc) - mean_hi.view(shape)
    out.mul_(b).addcmul_(dy.to(acc), a).add_(c)
    return out.to(x.dtype)


class SyncBatchNorm(_BatchNormForward, torch.nn.modules.batchnorm._BatchNorm):
    r"""Batch norm over the global batch of all ranks in ``process_group``.

    The constructor, parameters, buffers and state_dict keys are those of
    :class:`torch.nn.SyncBatchNorm` (``num_features, eps=1e-5, momentum=0.1,
    affine=True, track_running_stats=True, process_group=None, device=None,
    dtype=None``), computed by bnext's kernels and working with every
    torch.distributed backend, gloo on CPU included (torch's refuses
    non-CUDA input). It is deliberately *not* a subclass of
    ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses any such
    subclass in a CPU module.

    In training with an initialised process group of more than one rank the
    statistics are those of the concatenation of all ranks' inputs, as if one
    BatchNorm saw the global batch: one all_gather of per-channel (count,
    mean, M2) in forward, merged count-weighted; one all_reduce of
    (sum dy, sum dy*x_hat) in backward. Ranks may hold different batch sizes,
    including zero. ``weight``/``bias`` gradients are each rank's own share,
    as in torch; DDP sums them. Otherwise (eval, no process group, world
    size 1) it is a local bnext batch norm.

    Input: ``(N, C, *)`` with at least 2 dims; float32/float64/float16/
    bfloat16; contiguous or channels_last. Output: same shape, dtype and
    memory format. Raises what :func:`bnext.functional.batch_norm` raises.

    On CPU a global batch with one value per channel raises before any
    buffer changes; on CUDA that check is skipped (it would need a host
    synchronisation).

    Limitations: under ``torch.compile`` the synchronised training path runs
    eagerly (``torch.compiler.disable``): the graph breaks around it, so
    ``fullgraph=True`` is refused in distributed training; the local path
    (eval, single process) compiles like bnext's BatchNorm.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        self._check_input_dim(input)
        group = self.process_group or (dist.group.WORLD if dist.is_initialized() else None)
        world = dist.get_world_size(group) if group is not None else 1
        if not (self.training and world > 1):
            return super().forward(input)
        return self._synced_forward(input, group, world)

    # The collectives run eagerly: dynamo would otherwise have to trace
    # process-group calls inside an autograd.Function, which it cannot do.
    @torch.compiler.disable
    def _synced_forward(self, input, group, world):
        # Training (forward only gets here then): the running stats and
        # num_batches_tracked when they are tracked, None otherwise.
        running_mean, running_var, weight, bias, _, nbt = self._bn_arguments()
        check_batch_norm_args(input, running_mean, running_var, weight, bias, False, self.eps)
        return _SyncBatchNormFn.apply(
            input, weight, bias, running_mean, running_var, nbt, self.eps, self.momentum,
            group, world)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every batch norm in ``module`` with :class:`bnext.SyncBatchNorm`.

        Converts torch's and bnext's ``BatchNorm1d/2d/3d`` and torch's
        ``SyncBatchNorm``, keeping the same Parameter and buffer objects,
        train/eval flag and hooks. A subclass with a forward of its own (a
        fused activation, say) is left as it is rather than silently losing
        that behaviour (torch's converter drops it, pytorch/pytorch#187298).
        Children are replaced in place; returns the converted root.
        """
        from .convert import _retyped, replace_modules

        def replace(m):
            if type(m) is cls or not _convertible(m):
                return None
            new = _retyped(m, cls)
            new.process_group = process_group
            return new

        return replace_modules(module, replace)


def _convertible(m):
    bn = torch.nn.modules.batchnorm._BatchNorm
    if not isinstance(m, bn):
        return False
    return type(m).forward in (bn.forward, torch.nn.SyncBatchNorm.forward,
                               _BatchNormForward.forward)
