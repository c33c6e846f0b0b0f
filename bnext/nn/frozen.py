"""Frozen batch norm: fixed statistics and affine parameters, as used when
fine-tuning detection backbones (torchvision.ops.FrozenBatchNorm2d)."""

import torch
from torch import Tensor

from ._members import member
from ..functional import _batch_norm

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class _FrozenBatchNorm(torch.nn.Module):
    _dims: tuple = ()
    _shape: str = ""

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # torch's BatchNorm stores num_batches_tracked, torchvision's frozen BN
        # does not: accept both. A BN built with affine=False has no
        # weight/bias: that is the identity affine.
        state_dict.pop(prefix + "num_batches_tracked", None)
        for name, fill in (("weight", 1.0), ("bias", 0.0)):
            if prefix + name not in state_dict and prefix + "running_mean" in state_dict:
                state_dict[prefix + name] = torch.full_like(getattr(self, name), fill)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() not in self._dims:
            raise ValueError(f"expected {self._shape} input (got {input.dim()}D input)")
        buffers = self._buffers
        return _batch_norm(input, member(self, buffers, "running_mean"),
                           member(self, buffers, "running_var"), member(self, buffers, "weight"),
                           member(self, buffers, "bias"), False, None, self.eps, None)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


_DOC = """Batch norm with fixed statistics and affine parameters.

``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per
channel, in training and in eval alike. ``weight``, ``bias``,
``running_mean`` and ``running_var`` are ``(C,)`` buffers (no gradients,
never updated); only the input gets a gradient, so the module can sit in a
model that trains its other layers. Forward is bnext's eval kernel (one
fused scale-and-shift pass); backward is its input gradient.

Same semantics as ``torchvision.ops.FrozenBatchNorm2d`` (which uses
``eps=1e-5`` too). Loads state_dicts of ``torch.nn.{torch_name}`` (its
``num_batches_tracked`` is ignored; without ``weight``/``bias``, as saved by
``affine=False``, the identity affine is used) and of torchvision's frozen BN.

Args:
    num_features: C.
    eps: added to ``running_var``; units of the input squared.
    device, dtype: of the buffers.

Input: {shape}, any float dtype the buffers accept (see
:func:`bnext.functional.batch_norm`). Output: same shape, dtype and memory
format. Raises ``ValueError`` for a wrong number of dimensions and
``RuntimeError`` for a channel-count mismatch.
"""


class FrozenBatchNorm1d(_FrozenBatchNorm):
    __doc__ = _DOC.format(torch_name="BatchNorm1d", shape="``(N, C)`` or ``(N, C, L)``")
    _dims, _shape = (2, 3), "2D or 3D"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = _DOC.format(torch_name="BatchNorm2d", shape="``(N, C, H, W)``")
    _dims, _shape = (4,), "4D"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = _DOC.format(torch_name="BatchNorm3d", shape="``(N, C, D, H, W)``")
    _dims, _shape = (5,), "5D"
