"""Model tools: convert a model's batch norms to bnext's (and back), fuse
BN -> activation, freeze, fold into the layer before, recalibrate running
statistics. All are exported from ``bnext``."""

from .convert import convert_batchnorm, revert_batchnorm
from .fold import fold_batchnorm
from .freeze import freeze_batchnorm, unfreeze_batchnorm
from .recalibrate import recalibrate_batchnorm

__all__ = ["convert_batchnorm", "revert_batchnorm", "fold_batchnorm", "freeze_batchnorm",
           "unfreeze_batchnorm", "recalibrate_batchnorm"]
