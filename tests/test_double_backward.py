"""Gradients of gradients: gradgradcheck in float64 (train and eval), and
second derivatives equal to torch's batch norm."""

import pytest
import torch

import bnext.functional as BF

SHAPES = [(5, 3), (4, 3, 5), (3, 2, 3, 4), (2, 3, 2, 2, 3)]


def _args(shape, device, affine, channels_last):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w = torch.rand(C, dtype=torch.float64, device=device) + 0.5 if affine else None
    b = torch.randn(C, dtype=torch.float64, device=device) if affine else None
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "cl"])
def test_gradgradcheck(shape, training, affine, channels_last, device):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is a 4-D format")
    x, w, b = _args(shape, device, affine, channels_last)
    C = shape[1]
    rm = torch.randn(C, dtype=torch.float64, device=device)
    rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5
    inputs = [x.requires_grad_()] + ([w.requires_grad_(), b.requires_grad_()] if affine else [])

    def f(x, *wb):
        wt, bs = wb if affine else (None, None)
        return BF.batch_norm(x, None if training else rm, None if training else rv,
                             wt, bs, training=training)

    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_second_derivatives_equal_torch(training, device):
    """Hessian-vector products through the whole layer equal torch's."""
    x, w, b = _args((4, 3, 3, 3), device, True, False)
    rm = torch.randn(3, dtype=torch.float64, device=device)
    rv = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    v = torch.randn_like(x)
    results = []
    for fn in (torch.nn.functional.batch_norm, BF.batch_norm):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = fn(xs, rm.clone(), rv.clone(), ws, bs, training=training)
        loss = (y.tanh() * v).sum()
        gx, gw, gb = torch.autograd.grad(loss, (xs, ws, bs), create_graph=True)
        s = (gx * gx.detach().sin()).sum() + (gw * 1.7).sum() + (gb * gw).sum()
        results.append(torch.autograd.grad(s, (xs, ws, bs), allow_unused=True))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


def _composite_batch_norm(x, w, b, eps=1e-5):
    """Training batch norm from sums and elementwise ops: a reference whose
    every derivative comes from autograd."""
    dims = [0] + list(range(2, x.dim()))
    n = x.numel() // x.shape[1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xc = x - x.sum(dims, keepdim=True) / n
    var = (xc * xc).sum(dims, keepdim=True) / n
    return xc * torch.rsqrt(var + eps) * w.view(shape) + b.view(shape)


def test_third_order(device):
    """The second-derivative formula is itself differentiable: third
    derivatives pass gradgradcheck and equal autograd through a composite
    batch norm. (torch 2.13's own batch norm gets this third derivative wrong
    for the input; the test does not compare against it.)"""
    x, w, b = _args((4, 2, 3), device, True, False)
    c = torch.randn_like(x)
    inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())

    def f(x, w, b):
        return BF.batch_norm(x, None, None, w, b, training=True)

    def first(x, w, b):
        y = f(x, w, b)
        return torch.autograd.grad((y * c).sum(), (x, w), create_graph=True)

    assert torch.autograd.gradgradcheck(first, inputs)

    results = []
    for fn in (_composite_batch_norm, f):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in inputs)
        y = fn(xs, ws, bs)
        gx, gw = torch.autograd.grad((y * c).sum(), (xs, ws), create_graph=True)
        h = torch.autograd.grad((gx * gx).sum() + gw.square().sum(), (xs, ws), create_graph=True)
        results.append(torch.autograd.grad((h[0] * c).sum() + h[1].sum(), (xs, ws)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)
