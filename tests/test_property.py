"""Property-based comparison with torch over random shapes, layouts, options
and value ranges (hypothesis), complementing the fixed grid in
test_reference.py.

The reference is torch's module in float64 on the same values. Inputs such
as std 1e-3 around 5.0 make torch's own float32 CPU result 4e-4 off in
relative terms (found by this test), while bnext, which subtracts a float64
mean, stays at float32 rounding.

Acceptance for float32: every value within float32's default tolerance of
the float64 reference, or, where float32 arithmetic cannot get there, no
further from it than torch's own float32 CPU kernel. Ill-conditioned cases
exist: at |mean|/std = 5000, grad_input is a sum of terms far larger than
itself; measured there, bnext is 2.2x the tolerance and torch's float32
kernel 790x. float64 cases must always be within float64's tolerance."""


import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnext
from helpers import assert_close

CLASSES = {2: (bnext.BatchNorm1d,), 3: (bnext.BatchNorm1d,), 4: (bnext.BatchNorm2d,), 5: (bnext.BatchNorm3d,)}


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    n = draw(st.integers(1, 5))
    c = draw(st.integers(1, 20))
    spatial = [draw(st.integers(1, 9)) for _ in range(ndim - 2)]
    shape = (n, c, *spatial)
    # A training batch needs more than one value per channel.
    numel_per_channel = n
    for s in spatial:
        numel_per_channel *= s
    training = draw(st.booleans()) and numel_per_channel > 1
    layout = draw(st.sampled_from(["contiguous", "channels_last", "permuted"] if ndim >= 4
                                  else ["contiguous", "permuted"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 5.0, -100.0]))
    return dict(
        shape=shape, layout=layout, training=training, dtype=dtype, scale=scale, offset=offset,
        affine=draw(st.booleans()), track=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.5, None])),
        eps=draw(st.sampled_from([1e-5, 1e-3])),
        steps=draw(st.integers(1, 3)),
    )


def _check(actual, exact, torch32):
    """actual within default tolerance of exact, or no worse than torch32."""
    if actual.dtype == torch.float64:
        assert_close(actual, exact)
        return
    atol, rtol = 1e-5, 1.3e-6  # torch.testing defaults for float32
    tol = atol + rtol * exact.abs()
    ours = ((actual.double() - exact).abs() / tol).max().item()
    theirs = ((torch32.double() - exact).abs() / tol).max().item()
    assert ours <= max(1.0, theirs), f"bnext {ours:.3g}x tolerance, torch float32 {theirs:.3g}x"


def _make(shape, layout, dtype, scale, offset):
    x = torch.randn(shape, dtype=dtype) * scale + offset
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif layout == "permuted":
        # Same logical tensor, memory order with a spatial or batch dim last.
        perm = list(range(x.dim()))
        perm[0], perm[-1] = perm[-1], perm[0]
        x = x.permute(perm).contiguous().permute(perm)
    return x


# derandomize: CI must be reproducible. With thousands of random examples the
# float32 criterion can still fail in rare cases where bnext and torch are
# both just past float32's tolerance on a cancelling sum (seen: 1.51x vs
# 1.45x); see the closing notes of issue #3.
@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_random_cases_match_torch(case):
    torch.manual_seed(0)
    (cls,) = CLASSES[len(case["shape"])]
    ours = cls(case["shape"][1], eps=case["eps"], momentum=case["momentum"], affine=case["affine"],
               track_running_stats=case["track"], dtype=case["dtype"])
    if case["affine"]:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-1, 1)
    exact = bnext.revert_batchnorm(copy.deepcopy(ours)).double()
    torch_same = bnext.revert_batchnorm(copy.deepcopy(ours))  # torch in the input dtype
    for m in (ours, exact, torch_same):
        m.train(case["training"])
    for _ in range(case["steps"]):
        x = _make(case["shape"], case["layout"], case["dtype"], case["scale"], case["offset"])
        if not case["training"] and not case["track"]:
            per_channel = x.numel() // x.shape[1]
            if per_channel <= 1:
                return  # torch raises here too (batch statistics of one value)
        xo = x.detach().clone().requires_grad_(True)
        # The float64 reference runs on a dense copy: torch's CPU backward
        # returns wrong grad_input for some ambiguous strides (e.g. shape
        # (1, 2, 1, 2) with strides (1, 1, 1, 2)), found by this test.
        xe = x.detach().double().contiguous().clone().requires_grad_(True)
        xs = x.detach().clone().requires_grad_(True)
        yo, ye, ys = ours(xo), exact(xe), torch_same(xs)
        assert yo.stride() == ys.stride() and yo.dtype == x.dtype
        _check(yo, ye, ys)
        dy = torch.randn(ye.shape, dtype=x.dtype)
        yo.backward(dy)
        ye.backward(dy.double())
        ys.backward(dy)
        _check(xo.grad, xe.grad, xs.grad)
        for po, pe, ps in zip(ours.parameters(), exact.parameters(), torch_same.parameters()):
            _check(po.grad, pe.grad, ps.grad)
        with torch.no_grad():
            for bo, be, bs in zip(ours.buffers(), exact.buffers(), torch_same.buffers()):
                if bo.is_floating_point():
                    _check(bo, be, bs)
                else:
                    assert torch.equal(bo, bs)
                # Continue every step from bnext's state, so each step is
                # checked on its own rather than on drift between float32
                # and float64 buffers.
                be.copy_(bo)
                bs.copy_(bo)
