"""Convert every batch norm in a model to frozen BN, and back."""

import torch

from ..nn._replace import replace_modules
from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..nn.batchnorm_act import _BatchNormAct
from ..nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

__all__ = ["freeze_batchnorm", "unfreeze_batchnorm"]

_FROZEN = {
    torch.nn.BatchNorm1d: FrozenBatchNorm1d,
    torch.nn.BatchNorm2d: FrozenBatchNorm2d,
    torch.nn.BatchNorm3d: FrozenBatchNorm3d,
}
_UNFROZEN = {
    FrozenBatchNorm1d: BatchNorm1d,
    FrozenBatchNorm2d: BatchNorm2d,
    FrozenBatchNorm3d: BatchNorm3d,
}


def _frozen_class(module):
    if not module.track_running_stats or module.running_mean is None:
        return None  # batch statistics only: nothing to freeze
    for base, frozen in _FROZEN.items():
        if isinstance(module, base):  # torch's, bnext's and other subclasses
            return frozen
    return None


def _freeze(module):
    if isinstance(module, _BatchNormAct):
        return None  # a frozen BN would drop the fused activation
    cls = _frozen_class(module) if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) else None
    if cls is None:
        return None
    ref = module.running_mean
    new = cls(module.num_features, module.eps, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        new.running_mean.copy_(module.running_mean)
        new.running_var.copy_(module.running_var)
        if module.weight is not None:
            new.weight.copy_(module.weight)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    return new.train(module.training)


def _unfreeze(module):
    cls = _UNFROZEN.get(type(module))
    if cls is None:
        return None
    ref = module.running_mean
    new = cls(module.num_features, module.eps, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).copy_(getattr(module, name))
    return new.train(module.training)


def freeze_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` (torch's, bnext's, or a subclass)
    with ``bnext.FrozenBatchNorm1d/2d/3d``.

    The frozen module copies the BN's current ``running_mean``,
    ``running_var``, ``weight`` and ``bias`` (ones/zeros when ``affine=False``)
    and ``eps``; it normalizes with them in train and eval mode alike and
    never updates them. BNs with ``track_running_stats=False`` have no
    statistics to freeze and are left as they are, as is ``SyncBatchNorm``
    (its dimensionality is not known from the module) and bnext's fused
    ``BatchNormAct*`` (a frozen BN has no activation: use ``.eval()`` and
    ``requires_grad_(False)`` on those).

    Children are replaced in place; returns the converted root (a new object
    if ``model`` itself is a BN). A BN used twice becomes one frozen module.
    """
    return replace_modules(model, _freeze)


def unfreeze_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Inverse of :func:`freeze_batchnorm`: every ``bnext.FrozenBatchNorm*``
    becomes a trainable ``bnext.BatchNorm1d/2d/3d`` (``affine=True``,
    ``track_running_stats=True``, default momentum) initialised with the
    frozen values; ``num_batches_tracked`` starts at 0. Same in-place rules
    as :func:`freeze_batchnorm`."""
    return replace_modules(model, _unfreeze)
