"""BatchNormAct1d/2d/3d: batch norm, optional residual add and activation in
one fused module, ``y = act(bn(input) + residual)``."""

from typing import Optional

import torch
from torch import Tensor

from .._ops.activations import check_activation
from ..functional import _batch_norm_act
from .batchnorm import _BatchNormForward

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]


class _BatchNormAct(_BatchNormForward):
    """Forward of the fused modules; the BN half follows torch's
    ``_BatchNorm.forward`` exactly (``modules._BatchNormForward``)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, activation="relu", negative_slope=0.01,
                 memory_saving=False, device=None, dtype=None, **kwargs):
        check_activation(activation, negative_slope, memory_saving)
        # kwargs: keyword-only options of the installed torch's BatchNorm (bias=).
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **kwargs)
        self.activation = activation
        self.negative_slope = negative_slope
        self.memory_saving = memory_saving

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        running_mean, running_var, weight, bias, bn_training, nbt = self._bn_arguments()
        return _batch_norm_act(
            input, running_mean, running_var, weight, bias, bn_training,
            self.momentum, self.eps, nbt, residual, self.activation, self.negative_slope,
            self.memory_saving,
        )

    def extra_repr(self):
        s = super().extra_repr() + f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        if self.memory_saving:
            s += ", memory_saving=True"
        return s


_DOC = """Fused ``act(BatchNorm{d}d(input) + residual)``: one forward and one backward kernel.

A subclass of ``torch.nn.BatchNorm{d}d``: same parameters, buffers and
state_dict keys, so a checkpoint of an ``nn.BatchNorm{d}d`` followed by the
activation loads into it and back. The batch-norm half has torch's semantics
(training/eval, ``momentum=None`` cumulative average, ``track_running_stats``).

Args:
    num_features, eps, momentum, affine, track_running_stats, device, dtype:
        as ``torch.nn.BatchNorm{d}d`` (keyword-only options of the installed
        torch, such as ``bias=``, pass through).
    activation: ``"identity"``, ``"relu"`` (default), ``"leaky_relu"``,
        ``"elu"`` (alpha 1), ``"silu"``, ``"gelu"`` (erf) or ``"gelu_tanh"``.
    negative_slope: slope of ``leaky_relu`` below zero.
    memory_saving: keep only the output for backward (In-Place ABN's idea,
        without mutating the input; composes with torch.compile). Needs an
        invertible activation (identity, elu, leaky_relu with slope > 0) and
        no zero in ``weight``.

``forward(input, residual=None)``: input {shape}; float32, float64,
float16 or bfloat16; contiguous or channels_last. ``residual``: same shape and
dtype, or None. Output: input's shape, dtype and memory format.

What backward keeps: default, the input (and the residual, if any) plus
per-channel statistics, not both input and output as ``BatchNorm`` followed by
an activation does; ``memory_saving=True``, the output (and the residual).

Raises:
    ValueError: unknown activation; memory_saving with a non-invertible
        activation (at construction) or, on the CPU, a zero weight (at
        forward, before any buffer changes); the errors of
        ``torch.nn.BatchNorm{d}d``.
    RuntimeError: a residual of another shape, dtype or device; on CUDA,
        memory_saving with a zero weight (a device-side assert, reported by
        the next synchronising call: the check never synchronises).
"""


class BatchNormAct1d(_BatchNormAct, torch.nn.BatchNorm1d):
    __doc__ = _DOC.format(d=1, shape="``(N, C)`` or ``(N, C, L)``")


class BatchNormAct2d(_BatchNormAct, torch.nn.BatchNorm2d):
    __doc__ = _DOC.format(d=2, shape="``(N, C, H, W)``")


class BatchNormAct3d(_BatchNormAct, torch.nn.BatchNorm3d):
    __doc__ = _DOC.format(d=3, shape="``(N, C, D, H, W)``")
