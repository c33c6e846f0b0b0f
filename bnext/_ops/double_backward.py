"""Second derivatives of batch norm: the VJP of ``batch_norm_backward``.

``batch_norm_backward`` maps ``(grad_output g, input x, weight w)`` to
``(grad_input, grad_weight, grad_bias)``. Given the incoming gradients of
those three outputs, ``(P, Q, R)``, these functions return the gradients with
respect to ``g``, ``x`` and ``w``. They are written with differentiable
elementwise and sum ops only, so any higher order follows from autograd.

Derivation (training), per channel over its ``n`` reduced elements, with
``<.>`` the channel mean, ``r = 1/sqrt(var + eps)`` and ``xh = (x - mu) * r``::

    grad_input  = w r (g - <g> - xh <g xh>)
    grad_weight = n <g xh>,   grad_bias = n <g>

    d/dg = w r Proj(P) + Q xh + R,          Proj(U) = U - <U> - xh <U xh>
    d/dw = r * sum(P (g - <g> - xh <g xh>))
    d/dx = r Proj(U) - (s r^2 / n) xh,  with
           U = Q g - w r (<g xh> P + <P xh> g),  s = w * sum(P (g - <g> - xh <g xh>))

``d/dx`` uses that a function F(xh, r) of x has gradient
``r Proj(dF/dxh) - (dF/dr) r^2 xh / n`` (xh is centred and r depends on x
through the biased variance). In eval ``mu`` and ``r`` come from the running
statistics and are constants, which leaves ``d/dg = w r P + Q xh + R``,
``d/dw = r sum(P g)`` and ``d/dx = Q r g``. Same results as torch's
``batchnorm_double_backward`` (checked by gradgradcheck in the tests).
"""

from typing import Optional

import torch
from torch import Tensor

from .common import acc_dtype


def _dims(x: Tensor):
    return [0] + list(range(2, x.dim()))


def _per_channel(t: Optional[Tensor], x: Tensor, dtype) -> Optional[Tensor]:
    if t is None:
        return None
    return t.to(dtype).reshape([1, -1] + [1] * (x.dim() - 2))


def _csum(t: Tensor, dims) -> Tensor:
    return t.sum(dims, keepdim=True)


def double_backward(
    ggx: Optional[Tensor],
    ggw: Optional[Tensor],
    ggb: Optional[Tensor],
    grad_output: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    train: bool,
    eps: float,
    needs: tuple,
):
    """Gradients of ``(grad_output, input, weight)``; ``None`` where not
    needed. ``ggx``/``ggw``/``ggb`` may be ``None`` (treated as zero)."""
    dt = acc_dtype(input.dtype)
    dims = _dims(input)
    n = input.numel() // input.shape[1] if input.numel() else 1
    x = input.to(dt)
    g = grad_output.to(dt)
    w = _per_channel(weight, x, dt)
    P = ggx.to(dt) if ggx is not None else None
    Q = _per_channel(ggw, x, dt)
    R = _per_channel(ggb, x, dt)

    if train:
        mu = _csum(x, dims) / n
        xc = x - mu
        r = torch.rsqrt(_csum(xc * xc, dims) / n + eps)
    else:
        mu = _per_channel(running_mean, x, dt)
        r = torch.rsqrt(_per_channel(running_var, x, dt) + eps)
    xh = (x - mu) * r
    wr = r if w is None else w * r

    def proj(u):
        return u - _csum(u, dims) / n - xh * (_csum(u * xh, dims) / n)

    d_g = d_x = d_w = None
    zero = torch.zeros_like(x)
    if train:
        gc = proj(g) if P is not None else None  # g - <g> - xh <g xh>
        if needs[0]:
            d_g = zero
            if P is not None:
                d_g = d_g + wr * proj(P)
            if Q is not None:
                d_g = d_g + Q * xh
            if R is not None:
                d_g = d_g + R
        if needs[1]:
            U = zero
            if Q is not None:
                U = U + Q * g
            if P is not None:
                b_gxh = _csum(g * xh, dims) / n
                b_pxh = _csum(P * xh, dims) / n
                U = U - wr * (b_gxh * P + b_pxh * g)
            d_x = r * proj(U)
            if P is not None:
                s = _csum(P * gc, dims)
                if w is not None:
                    s = s * w
                d_x = d_x - (s * r * r / n) * xh
        if needs[2] and weight is not None and P is not None:
            d_w = (r * _csum(P * gc, dims)).reshape(-1)
    else:
        if needs[0]:
            d_g = zero
            if P is not None:
                d_g = d_g + wr * P
            if Q is not None:
                d_g = d_g + Q * xh
            if R is not None:
                d_g = d_g + R
        if needs[1]:
            d_x = Q * r * g if Q is not None else zero
        if needs[2] and weight is not None and P is not None:
            d_w = _csum(P * r * g, dims).reshape(-1)

    if needs[2] and weight is not None and d_w is None:
        d_w = torch.zeros_like(weight)
    return (
        d_g.to(grad_output.dtype) if d_g is not None else None,
        d_x.to(input.dtype) if d_x is not None else None,
        d_w.to(weight.dtype) if d_w is not None else None,
    )
