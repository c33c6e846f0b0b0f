"""SyncBatchNorm over torch.distributed, on any backend (gloo included).

Training statistics are those of the global batch, from bnext's phase ops
(csrc/ops.cpp): each rank takes its per-channel (count, mean, M2) with
``batch_norm_moments``, one all_gather exchanges them and
``batch_norm_merge_moments`` merges them exactly (Chan et al., never
E[x^2] - E[x]^2); ``batch_norm_elemt`` normalizes. Backward:
``batch_norm_backward_reduce``, one all_reduce of the two (C,) sums,
``batch_norm_backward_elemt``. The collectives are torch's functional ones,
which torch.compile traces, so the layer compiles without graph breaks.
Semantics follow torch.nn.SyncBatchNorm.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .._ops import ops
from .._ops.common import cast_like
from ._replace import replace_modules, retyped
from .batchnorm_act import _BatchNormAct
from .batchnorm import _BatchNormForward

__all__ = ["SyncBatchNorm", "SyncBatchNormAct"]


class _SyncElemtFn(torch.autograd.Function):
    """``act(batch_norm(input) + residual)`` with the global statistics.

    ``mean``, ``invstd`` and ``count`` come from the merged moments of all
    ranks' inputs; backward accounts for their dependence on ``input``
    through the all-reduced sums, as torch's SyncBatchNorm does.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, residual, mean, invstd, count, activation,
                negative_slope, group_name):
        ctx.save_for_backward(input, weight, bias, residual, mean, invstd, count)
        ctx.activation, ctx.negative_slope, ctx.group_name = activation, negative_slope, group_name
        return ops.batch_norm_elemt(input, weight, bias, mean, invstd, residual, activation,
                                    negative_slope)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, residual, mean, invstd, count = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # With a residual, g (= grad_residual) is also the second pass's input.
        mask = [weight is not None and needs[1], bias is not None and needs[2],
                residual is not None]
        sums, grad_weight, grad_bias, grad_residual = ops.batch_norm_backward_reduce(
            grad_output, input, mean, invstd, weight, bias, residual, ctx.activation,
            ctx.negative_slope, mask)
        grad_input = None
        if needs[0]:
            sums = funcol.all_reduce(sums, "sum", ctx.group_name)
            grad_input = ops.batch_norm_backward_elemt(
                grad_output, input, mean, invstd, weight, bias, residual, grad_residual, sums,
                count, ctx.activation, ctx.negative_slope)
        grad_bias = cast_like(grad_bias, bias)
        if not needs[3]:
            grad_residual = None
        return (grad_input, grad_weight, grad_bias, grad_residual,
                None, None, None, None, None, None)


def synced_batch_norm(input, weight, bias, running_mean, running_var, num_batches_tracked,
                      momentum, eps, group, world_size, residual=None, activation="identity",
                      negative_slope=0.01):
    """Training batch norm over the concatenated inputs of ``group``'s ranks.

    One all_gather of the (3, C) moments, no host synchronisation; the
    running statistics (when given) get the global mean and unbiased
    variance. ``num_batches_tracked`` is counted once the statistics exist,
    so a rejected call changes no buffer.
    """
    group_name = funcol._resolve_group_name(group)
    moments = ops.batch_norm_moments(input.detach())
    gathered = funcol.all_gather_single(moments, 0, group_name)
    mean, invstd, unbiased_var, count = ops.batch_norm_merge_moments(
        gathered.view(world_size, 3, input.shape[1]), eps)
    output = _SyncElemtFn.apply(input, weight, bias, residual, mean, invstd, count,
                                activation, negative_slope, group_name)
    if running_mean is not None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None and num_batches_tracked is None:
            momentum = 0.0  # torch's factor when nothing is counted
        ops.update_running_stats(running_mean, running_var, mean, unbiased_var, momentum,
                                 num_batches_tracked if momentum is None else None)
    return output


def _check_input_dim(input):
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


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
    mean, M2) in forward, merged exactly; one all_reduce of
    (sum dy, sum dy*(x - mean)) in backward. Three passes over the
    activation forward and five backward, as a local batch norm. Ranks may hold different batch sizes,
    including zero. ``weight``/``bias`` gradients are each rank's own share,
    as in torch; DDP sums them. Otherwise (eval, no process group, world
    size 1) it is a local bnext batch norm.

    Input: ``(N, C, *)`` with at least 2 dims; float32/float64/float16/
    bfloat16; contiguous or channels_last. Output: same shape, dtype and
    memory format. Raises what :func:`bnext.functional.batch_norm` raises.

    On CPU a global batch with one value per channel raises before any
    buffer changes; on CUDA that check is skipped (it would need a host
    synchronisation).

    Under ``torch.compile`` (``fullgraph=True`` included) the collectives
    are torch's functional ones, traced into the graph: no graph break.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    _check_input_dim = staticmethod(_check_input_dim)

    def forward(self, input):
        self._check_input_dim(input)
        synced = _synced_group(self)
        if synced is None:
            return super().forward(input)
        return _synced_module_forward(self, input, *synced)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every batch norm in ``module`` with :class:`bnext.SyncBatchNorm`.

        Converts torch's and bnext's ``BatchNorm1d/2d/3d`` and torch's
        ``SyncBatchNorm``, keeping the same Parameter and buffer objects,
        train/eval flag and hooks. bnext's fused ``BatchNormAct1d/2d/3d``
        become :class:`SyncBatchNormAct` with the same activation (those
        with ``memory_saving=True`` stay as they are: the synchronised
        backward reads the input). Any other subclass with a forward of its
        own is left as it is rather than silently losing that behaviour
        (torch's converter drops it, pytorch/pytorch#187298). Children are
        replaced in place; returns the converted root.
        """
        def replace(m):
            if type(m) in (cls, SyncBatchNormAct):
                return None
            if _convertible_act(m):
                new = retyped(m, SyncBatchNormAct)
            elif _convertible(m):
                new = retyped(m, cls)
            else:
                return None
            new.process_group = process_group
            return new

        return replace_modules(module, replace)


class SyncBatchNormAct(_BatchNormAct, torch.nn.modules.batchnorm._BatchNorm):
    r"""Fused ``act(batch_norm(input) + residual)`` over the global batch of
    all ranks in ``process_group``: :class:`SyncBatchNorm`'s statistics and
    :class:`bnext.BatchNormAct2d`'s fused activation and residual.

    Constructor: ``num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, activation="relu", negative_slope=0.01,
    process_group=None, device=None, dtype=None``; parameters, buffers and
    state_dict keys are torch's BatchNorm's. ``forward(input, residual=None)``
    with ``input`` ``(N, C, *)`` and ``residual`` of its shape and dtype; the
    activations are those of :class:`bnext.BatchNormAct2d`. In training with
    more than one rank: one all_gather forward, one all_reduce backward, as
    :class:`SyncBatchNorm`; otherwise the local fused batch norm.
    ``memory_saving`` is not offered: the synchronised backward reads the
    input. Raises what :class:`SyncBatchNorm` and
    :class:`bnext.BatchNormAct2d` raise.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, activation="relu", negative_slope=0.01,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         activation=activation, negative_slope=negative_slope,
                         memory_saving=False, device=device, dtype=dtype)
        self.process_group = process_group

    _check_input_dim = staticmethod(_check_input_dim)

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        synced = _synced_group(self)
        if synced is None:
            return super().forward(input, residual)
        return _synced_module_forward(self, input, *synced, residual, self.activation,
                                      self.negative_slope)


def _synced_group(module):
    """(group, world size) when ``module`` synchronises this call, else None."""
    if not module.training:
        return None
    group = module.process_group or (dist.group.WORLD if dist.is_initialized() else None)
    world = dist.get_world_size(group) if group is not None else 1
    return (group, world) if world > 1 else None


def _synced_module_forward(module, input, group, world, residual=None, activation="identity",
                           negative_slope=0.01):
    # Training (forward only gets here then): the running stats and
    # num_batches_tracked when they are tracked, None otherwise.
    running_mean, running_var, weight, bias, _, nbt = module._bn_arguments()
    if running_mean is not None:
        # The buffers against the input and parameters, before anything
        # moves; eval's rules, since one value per channel on this rank is
        # fine (the global count is checked when the moments merge). The
        # phase ops check the rest.
        ops.check_batch_norm_call(input, weight, bias, running_mean, running_var, nbt, False,
                                  module.eps)
    return synced_batch_norm(input, weight, bias, running_mean, running_var, nbt,
                             module.momentum, module.eps, group, world, residual, activation,
                             negative_slope)


def _convertible(m):
    bn = torch.nn.modules.batchnorm._BatchNorm
    if not isinstance(m, bn):
        return False
    return type(m).forward in (bn.forward, torch.nn.SyncBatchNorm.forward,
                               _BatchNormForward.forward)


def _convertible_act(m):
    """A bnext BatchNormAct without memory_saving (SyncBatchNormAct's backward
    reads the input)."""
    return (isinstance(m, _BatchNormAct) and type(m).forward is _BatchNormAct.forward
            and not m.memory_saving)
