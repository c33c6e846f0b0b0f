"""The arithmetic of folding an eval batch norm into the layer before it,
shared by module folding (``fold.py``) and ExportedProgram folding
(``fold_export.py``).

An eval BN is the per-channel affine map ``y = z * scale + shift`` with
``scale = weight / sqrt(running_var + eps)`` and
``shift = bias - running_mean * scale``.
"""

import torch


def _scale_shift(bn):
    f64 = torch.float64
    mean, var = bn.running_mean.to(f64), bn.running_var.to(f64)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(f64)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(f64)
    return scale, shift


def folded_weight_bias(weight, bias, bn, kind):
    """Folded ``(weight, bias)`` in the layer's dtype; computed in float64.

    ``kind`` is ``"conv"`` (weight ``(C_out, C_in/groups, *k)``), ``"linear"``
    (``(C_out, C_in)``) or ``("transposed", groups)`` (weight
    ``(C_in, C_out/groups, *k)``).
    """
    scale, shift = _scale_shift(bn)
    w = weight.detach().to(torch.float64)
    if kind == "conv" or kind == "linear":
        w = w * scale.reshape([-1] + [1] * (w.dim() - 1))
    else:
        groups = kind[1]
        shape = w.shape
        w = w.reshape(groups, shape[0] // groups, shape[1], *shape[2:])
        w = w * scale.reshape(groups, 1, shape[1], *([1] * (len(shape) - 2)))
        w = w.reshape(shape)
    b = shift if bias is None else bias.detach().to(torch.float64) * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)
