"""bnext: fused batch-normalization kernels for PyTorch.

Drop-in ``BatchNorm1d/2d/3d`` modules, a functional ``batch_norm`` with torch's
signature, and model converters. All computation runs in bnext's own C++
(and, where built, CUDA) kernels, registered as ``torch.ops.bnext.*``.
"""

from . import functional
from ._ops import ops
from . import _autograd  # noqa: F401  (autograd formulas)
from . import _vmap  # noqa: F401  (batching rules for torch.vmap)
from . import _act_autograd  # noqa: F401  (fused-op autograd)
from .convert import convert_batchnorm, revert_batchnorm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .freeze import freeze_batchnorm, unfreeze_batchnorm
from .fold import fold_batchnorm
from .recalibrate import recalibrate_batchnorm
from .sync import SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "SyncBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "convert_batchnorm",
    "fold_batchnorm",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
    "revert_batchnorm",
    "functional",
    "recalibrate_batchnorm",
    "ops",
]
