"""Drop-in replacements for torch.nn.BatchNorm1d/2d/3d."""

import torch
from torch import Tensor

from ._members import member
from ..functional import _batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNormForward:
    """torch's ``_BatchNorm.forward`` semantics, on bnext's kernels.

    One difference, on purpose: every argument is validated before
    ``num_batches_tracked`` is incremented, so a rejected call changes nothing
    (torch increments first, then raises).
    """

    def _bn_arguments(self):
        """(running_mean, running_var, weight, bias, training,
        num_batches_tracked) as torch's ``_BatchNorm.forward`` passes them to
        the functional op."""
        params, buffers = self._parameters, self._buffers
        running_mean = member(self, buffers, "running_mean")
        running_var = member(self, buffers, "running_var")
        # Batch statistics in training, and in eval when there are no buffers.
        bn_training = self.training or (running_mean is None and running_var is None)
        tracking = self.training and self.track_running_stats
        # Buffers are only updated when they are used for normalization
        # (eval) or when they track stats (training).
        use_buffers = not self.training or self.track_running_stats
        return (running_mean if use_buffers else None,
                running_var if use_buffers else None,
                member(self, params, "weight"),
                member(self, params, "bias"),
                bn_training,
                member(self, buffers, "num_batches_tracked") if tracking else None)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        running_mean, running_var, weight, bias, bn_training, nbt = self._bn_arguments()
        return _batch_norm(input, running_mean, running_var, weight, bias,
                           bn_training, self.momentum, self.eps, nbt)


_DOC = """Drop-in replacement for :class:`torch.nn.{name}`, computed by bnext's kernels.

A subclass of ``torch.nn.{name}``: the constructor (``num_features, eps=1e-5,
momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None``
and any keyword-only argument of the installed torch, such as ``bias=``),
parameters, buffers and state_dict keys are torch's, so checkpoints load both
ways and ``isinstance(m, torch.nn.{name})`` holds.

Input: {shape}; float32, float64, float16 or bfloat16, contiguous or
channels_last. Output: same shape, dtype and memory format.
``momentum=None`` gives a cumulative average over ``num_batches_tracked``
batches. Errors: ``ValueError`` for a wrong number of dimensions or a training
batch with one value per channel, ``RuntimeError`` for a channel-count
mismatch, raised before any buffer changes.
"""


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    __doc__ = _DOC.format(name="BatchNorm1d", shape="``(N, C)`` or ``(N, C, L)``")


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    __doc__ = _DOC.format(name="BatchNorm2d", shape="``(N, C, H, W)``")


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    __doc__ = _DOC.format(name="BatchNorm3d", shape="``(N, C, D, H, W)``")
