"""bnext's modules: drop-in batch norm, fused batch norm + activation,
frozen batch norm and SyncBatchNorm. All are exported from ``bnext``."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .sync import SyncBatchNorm, SyncBatchNormAct

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
    "SyncBatchNorm", "SyncBatchNormAct",
]
