"""bnext: fused batch-normalization kernels for PyTorch.

Drop-in ``BatchNorm1d/2d/3d`` modules, a functional ``batch_norm`` with torch's
signature, and model converters. All computation runs in bnext's own C++
(and, where built, CUDA) kernels, registered as ``torch.ops.bnext.*``.
"""

from ._build import load_build_info as _load_build_info

_load_build_info()  # before the compiled libraries: a torch mismatch is an ImportError, not a crash

from . import functional  # noqa: E402
from ._ops import ops  # noqa: E402
from . import _autograd  # noqa: F401,E402  (autograd formulas)
from . import _vmap  # noqa: F401,E402  (batching rules for torch.vmap)
from . import _act_autograd  # noqa: F401,E402  (fused-op autograd)
from .convert import convert_batchnorm, revert_batchnorm  # noqa: E402
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d  # noqa: E402
from .batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d  # noqa: E402
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d  # noqa: E402
from .freeze import freeze_batchnorm, unfreeze_batchnorm  # noqa: E402
from .fold import fold_batchnorm  # noqa: E402
from .recalibrate import recalibrate_batchnorm  # noqa: E402
from .sync import SyncBatchNorm, SyncBatchNormAct  # noqa: E402

from ._cpu_capability import get_cpu_capability  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "convert_batchnorm",
    "fold_batchnorm",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
    "revert_batchnorm",
    "functional",
    "get_cpu_capability",
    "recalibrate_batchnorm",
    "ops",
]
