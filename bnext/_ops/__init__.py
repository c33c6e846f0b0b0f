"""bnext's op registrations, one module per op family.

Every op is declared once in ``csrc/ops.cpp`` and implemented in C++ (CPU,
CUDA) with C++ autograd where the call path is hot. This package loads
those libraries and adds, per family, what torch.compile, autograd and
torch.func need from Python: fake (meta) kernels whose output sizes,
strides, dtypes and devices equal the real kernels' (checked by
``torch.library.opcheck``), autograd formulas and batching rules.

* ``batch_norm``: training, eval, backward, the training step, the running
  statistics update and the argument check;
* ``batch_norm_act``: the same with a fused activation and residual;
* ``phase``: the passes SyncBatchNorm composes (moments, merge, elemt,
  backward reduce, backward elemt);
* ``activations``: the activation table as Python sees it.
"""

from .. import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
from .. import _cpu_capability

_cpu_capability.load_best()  # the CPU kernels of this CPU's level

from .common import acc_dtype, ops, output_memory_format  # noqa: E402
from . import batch_norm, batch_norm_act, phase  # noqa: E402,F401  (registrations)

__all__ = ["ops", "acc_dtype", "output_memory_format"]
