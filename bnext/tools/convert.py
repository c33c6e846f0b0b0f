"""Swap torch's BatchNorm modules for bnext's in a model, and back."""

import torch

from ..nn._replace import replace_modules, retyped
from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from . import fuse

__all__ = ["convert_batchnorm", "revert_batchnorm"]

_TO_BNEXT = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH = {v: k for k, v in _TO_BNEXT.items()}


def _swap(module: torch.nn.Module, table: dict, memo: dict) -> torch.nn.Module:
    def replace(m):
        cls = table.get(type(m))
        return retyped(m, cls) if cls is not None else None

    return replace_modules(module, replace, memo)


def convert_batchnorm(
    module: torch.nn.Module, fuse_activations: bool = False, memory_saving: bool = False
) -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` with bnext's.

    Only those exact classes are converted (not subclasses such as
    ``SyncBatchNorm``). Parameters and buffers are the same objects as before,
    so device, dtype, values and optimizer state carry over, as do the
    train/eval flag and hooks. Children are replaced in place; the return
    value is the converted root (a new object if ``module`` itself is a BN).

    Args:
        module: any ``torch.nn.Module``.
        fuse_activations: also fuse BN -> activation and
            BN -> add -> activation into :class:`bnext.BatchNormAct2d` (and
            1d/3d), for the activations it supports (ReLU, LeakyReLU, ELU with
            alpha 1, SiLU, GELU; as modules, functions or ``.relu()``). Found
            in ``nn.Sequential`` containers and, with ``torch.fx``, in
            traceable modules: a module that traces and contains such a
            pattern is returned as a ``torch.fx.GraphModule`` (Python control
            flow in its forward is fixed at conversion, as with any fx
            rewrite); one that does not trace is left as it is, and its
            children are tried instead. A BN called from two places, or whose
            output is used elsewhere too, is not fused.
        memory_saving: give fused layers with an invertible activation
            (identity, leaky_relu, elu) ``memory_saving=True``.

    Returns:
        The module with bnext BatchNorm layers.

    Raises:
        ValueError: ``memory_saving`` without ``fuse_activations``.
    """
    if fuse_activations:
        module = fuse.fuse_activations(module, memory_saving)
    elif memory_saving:
        raise ValueError("memory_saving=True applies to fused layers: pass fuse_activations=True")
    return _swap(module, _TO_BNEXT, {})


def revert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Inverse of :func:`convert_batchnorm`: bnext BatchNorm back to torch's.

    Same guarantees: shared Parameter/buffer objects, flags and hooks kept,
    children replaced in place, converted root returned. Fused
    ``BatchNormAct`` layers stay as they are (undoing a fusion would need the
    activation back in the graph).
    """
    return _swap(module, _TO_TORCH, {})
