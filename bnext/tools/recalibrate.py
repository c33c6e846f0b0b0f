"""Exact population statistics for every batch norm ("precise BN").

Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), §3: replace the
running averages, which lag behind the final weights, with the true mean and
variance of each BN's inputs over a set of batches.
"""

import itertools

import torch
import torch.distributed as dist

from .._ops import ops
from ..nn.frozen import _FrozenBatchNorm

__all__ = ["recalibrate_batchnorm"]

_BN = torch.nn.modules.batchnorm._BatchNorm


def _merge(moments):
    """Merge a (K, 3, C) stack of (count, mean, M2) rows into one (3, C).

    Count-weighted (Chan, Golub & LeVeque's parallel variance), in float64,
    never E[x^2] - E[x]^2. ``bnext::batch_norm_merge_moments`` does the same
    for SyncBatchNorm but refuses a total count of at most 1, which
    recalibration must accept (it then stores NaN as torch would)."""

    counts, means, m2s = moments[:, 0], moments[:, 1], moments[:, 2]
    n = counts.sum(0)
    mean = (counts * means).sum(0) / n.clamp_min(1)
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return torch.stack([n, mean, m2])


class _Stop(Exception):
    """Ends a forward pass once the BN being calibrated has seen its input."""


def _population_moments(per_batch, group):
    """(n, mean, M2) over all batches, and over all ranks when distributed:
    one all_gather of this rank's merged (count, mean, M2) per BN."""
    local = _merge(torch.stack(per_batch))
    if _distributed(group):
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        local = _merge(torch.stack(parts))
    return local


def _input_of(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _device_of(model):
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def _distributed(group):
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


@torch.no_grad()
def recalibrate_batchnorm(model, data, num_batches=None, *, process_group=None):
    """Set every batch norm's ``running_mean``/``running_var`` to the exact
    mean and unbiased variance of its inputs over ``data``.

    BNs are recalibrated one at a time in the order the forward pass calls
    them, with the model in eval mode, so each BN's statistics are measured
    on inputs produced by the already-recalibrated BNs before it: the
    statistics the model will see at inference. A pass for one BN stops right
    after that BN (unless the BN is called more than once per forward), so the
    cost is about half a forward pass over ``data`` per BN.

    Args:
        model: any module; BNs are torch's or bnext's ``BatchNorm1d/2d/3d``
            (and subclasses) with ``track_running_stats=True``. Frozen BNs and
            BNs without running stats are left alone, as is any BN the
            forward pass does not call.
        data: iterable of input tensors, or of tuples/lists whose first
            element is the input (``(input, target)`` from a DataLoader). The
            first ``num_batches`` items are read once and kept (on the model's
            device) for the passes, so every BN sees the same samples.
        num_batches: how many items of ``data`` to use; all when None.
        process_group: when torch.distributed is initialised with more than
            one rank in this group, per-rank statistics are combined weighted
            by their counts (an all_gather per BN; every rank must call this
            with the same model). Default: the world.

    Returns:
        ``model``, with updated buffers, its own and every submodule's
        train/eval flag restored; ``momentum`` and ``num_batches_tracked``
        are not changed.

    Raises:
        ValueError: ``data`` yields no batch.
    """
    device = _device_of(model)
    batches = []
    for item in itertools.islice(data, num_batches):
        x = _input_of(item)
        batches.append(x.to(device) if device is not None else x)
    if not batches:
        raise ValueError("recalibrate_batchnorm: data yielded no batch")

    targets = [m for m in model.modules() if isinstance(m, _BN)
               and not isinstance(m, _FrozenBatchNorm) and m.running_mean is not None]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        order, calls = _call_order(model, targets, batches[0])
        for bn in order:
            _calibrate(model, bn, calls[bn] == 1, batches, process_group)
    finally:
        for m, training in modes.items():
            m.training = training
    return model


def _call_order(model, targets, batch):
    order, calls = [], {}

    def record(module, args):
        if module not in calls:
            order.append(module)
        calls[module] = calls.get(module, 0) + 1

    handles = [m.register_forward_pre_hook(record) for m in targets]
    try:
        model(batch)
    finally:
        for h in handles:
            h.remove()
    return order, calls


def _calibrate(model, bn, stop_early, batches, group):
    per_batch = []

    def collect(module, args):
        per_batch.append(ops.batch_norm_moments(args[0]).to(bn.running_mean.device))
        if stop_early:
            raise _Stop

    handle = bn.register_forward_pre_hook(collect)
    try:
        for x in batches:
            try:
                model(x)
            except _Stop:
                pass
    finally:
        handle.remove()
    n, mean, m2 = _population_moments(per_batch, group)
    count = n[0].item() if n.numel() else 0
    if count == 0:
        return
    bn.running_mean.copy_(mean)
    if count > 1:
        bn.running_var.copy_(m2 / (count - 1))
    else:  # one sample: no unbiased variance exists; torch would store nan
        bn.running_var.fill_(float("nan"))
