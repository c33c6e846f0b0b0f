"""gradcheck in float64, train and eval, for every layout and optional arg."""

import pytest
import torch

import bnext
from helpers import make_input
from references import SAMPLE_IDS, SAMPLES


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape,layout", SAMPLES, ids=SAMPLE_IDS)
def test_gradcheck(shape, layout, affine, training, device):
    C = shape[1]
    x = make_input(shape, layout, torch.float64, device).requires_grad_(True)
    w = torch.rand(C, dtype=torch.float64, device=device).add(0.5).requires_grad_(affine)
    b = torch.randn(C, dtype=torch.float64, device=device).requires_grad_(affine)
    rm = torch.randn(C, dtype=torch.float64, device=device)
    rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5

    def f(x, w, b):
        # Fresh copies: the training path updates running stats in place.
        return bnext.functional.batch_norm(
            x, rm.clone(), rv.clone(), w if affine else None, b if affine else None,
            training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5)


def test_only_requested_gradients_are_computed(device):
    x = torch.randn(4, 3, 5, device=device)
    w = torch.rand(3, device=device)
    b = torch.randn(3, device=device)
    m = torch.rand(3, device=device)
    s = torch.rand(3, device=device) + 0.5
    dy = torch.randn_like(x)
    out = torch.ops.bnext.batch_norm_backward(dy, x, w, None, None, m, s, True, 1e-5, [False, True, False])
    assert out[0] is None and out[2] is None and out[1].shape == (3,)
    out = torch.ops.bnext.batch_norm_backward(dy, x, w, None, None, m, s, True, 1e-5, [True, False, False])
    assert out[0].shape == x.shape and out[1] is None and out[2] is None


def test_frozen_affine_gets_no_grad(device):
    m = bnext.BatchNorm2d(3, device=device)
    m.weight.requires_grad_(False)
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    m(x).sum().backward()
    assert m.weight.grad is None and m.bias.grad is not None and x.grad is not None
