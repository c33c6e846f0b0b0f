"""bnext: fused batch-normalization kernels for PyTorch.

Drop-in ``BatchNorm1d/2d/3d`` modules, a functional ``batch_norm`` with torch's
signature, and model converters. All computation runs in bnext's own C++
(and, where built, CUDA) kernels, registered as ``torch.ops.bnext.*``.

Layout: ``bnext.nn`` (modules), ``bnext.functional``, ``bnext.tools`` (convert,
fuse, fold, freeze, recalibrate), ``bnext._ops`` (op registrations by op
family: fake kernels, autograd, batching rules; the kernels are in csrc/).
"""

import sys as _sys

from ._build import load_build_info as _load_build_info

_load_build_info()  # before the compiled libraries: a torch mismatch is an ImportError, not a crash

from ._ops import ops  # noqa: E402  (loads the kernels, registers fake kernels and autograd)
from . import functional  # noqa: E402
from .nn import (  # noqa: E402
    BatchNorm1d, BatchNorm2d, BatchNorm3d,
    BatchNormAct1d, BatchNormAct2d, BatchNormAct3d,
    FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d,
    SyncBatchNorm, SyncBatchNormAct,
)
from .tools import (  # noqa: E402
    convert_batchnorm, fold_batchnorm, freeze_batchnorm, recalibrate_batchnorm,
    revert_batchnorm, unfreeze_batchnorm,
)
from ._cpu_capability import cpu_tuning, get_cpu_capability, set_cpu_tuning  # noqa: E402
from . import _moved  # noqa: E402

_moved.install(_sys.modules[__name__])

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
    "set_cpu_tuning",
    "cpu_tuning",
    "recalibrate_batchnorm",
    "ops",
]
