"""Torch references shared by the test modules: module configurations, the
fused ops' activations, and one training step compared with torch (output,
strides, every gradient) plus the running buffers."""

import copy

import torch
import torch.nn.functional as F

import bnext
from helpers import assert_close, make_input, reference_dtype

# The plain batch-norm family's sample inputs, (shape, layout): every rank
# with each layout it has. Reference comparisons (test_reference), gradcheck
# (test_autograd) and opcheck (test_opcheck) all run over this one list.
SAMPLES = [
    ((16, 6), "contiguous"),
    ((8, 6), "strided"),
    ((4, 6, 9), "contiguous"),
    ((4, 6, 9), "strided"),
    ((4, 6, 5, 7), "contiguous"),
    ((4, 6, 5, 7), "channels_last"),
    ((3, 6, 4, 5), "strided"),
    ((2, 6, 3, 4, 5), "contiguous"),
    ((2, 6, 3, 4, 5), "channels_last"),
]

# (bnext class, torch class) by input rank.
MODULES = {
    2: (bnext.BatchNorm1d, torch.nn.BatchNorm1d),
    3: (bnext.BatchNorm1d, torch.nn.BatchNorm1d),
    4: (bnext.BatchNorm2d, torch.nn.BatchNorm2d),
    5: (bnext.BatchNorm3d, torch.nn.BatchNorm3d),
}


SAMPLE_IDS = [f"{'x'.join(map(str, shape))}-{layout}" for shape, layout in SAMPLES]

# (affine, track_running_stats, momentum, bias)
CONFIGS = [
    (True, True, 0.1, True),
    (True, True, None, True),
    (False, True, 0.3, True),
    (True, False, 0.1, True),
    (True, True, 0.1, False),
    (False, False, 0.1, True),
]


def config_id(cfg):
    affine, track, momentum, bias = cfg
    return f"affine{int(affine)}-track{int(track)}-mom{momentum}-bias{int(bias)}"


def module_pair(bnext_cls, torch_cls, cfg, in_dtype, param_dtype, device, channels=6):
    """bnext module in (in_dtype, param_dtype) and the torch reference module
    with the same values, in reference_dtype(in_dtype) when that is wider."""
    affine, track, momentum, bias = cfg
    ours = bnext_cls(channels, momentum=momentum, affine=affine, track_running_stats=track,
                     bias=bias, device=device, dtype=param_dtype)
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            if ours.bias is not None:
                ours.bias.uniform_(-0.5, 0.5)
    ref = bnext.revert_batchnorm(copy.deepcopy(ours))
    assert type(ref) is torch_cls
    ref_dtype = reference_dtype(in_dtype)
    if ref_dtype != in_dtype:
        ref = ref.to(ref_dtype)
    return ours, ref


def params(m):
    return [p for p in (m.weight, m.bias) if p is not None]


def step_and_compare(ours, ref, x, dy, ref_dtype=None):
    ref_dtype = ref_dtype or reference_dtype(x.dtype)
    xo = x.detach().clone().requires_grad_(True)
    xr = x.detach().to(ref_dtype).requires_grad_(True)
    yo = ours(xo)
    yr = ref(xr)
    assert yo.dtype == x.dtype and yo.shape == yr.shape
    assert yo.stride() == yr.stride(), "output memory format differs from torch"
    assert_close(yo, yr)
    yo.backward(dy)
    yr.backward(dy.to(ref_dtype))
    assert_close(xo.grad, xr.grad)
    for po, pr in zip(params(ours), params(ref)):
        assert_close(po.grad, pr.grad)
        po.grad = None
        pr.grad = None


def buffers_match(ours, ref):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)
            # A wider reference keeps unrounded buffers; continue from ours so
            # each step is checked on its own rather than on drift from
            # storing the buffers in bfloat16/float16.
            with torch.no_grad():
                b.copy_(a)


# ------------------------------------------------ fused batch norm + activation

ACTS = {
    "identity": lambda z, s: z,
    "relu": lambda z, s: F.relu(z),
    "leaky_relu": lambda z, s: F.leaky_relu(z, s),
    "elu": lambda z, s: F.elu(z),
    "silu": lambda z, s: F.silu(z),
    "gelu": lambda z, s: F.gelu(z),
    "gelu_tanh": lambda z, s: F.gelu(z, approximate="tanh"),
}
INVERTIBLE = ("identity", "leaky_relu", "elu")
# The fused family's sample cases, (activation, memory_saving): every
# activation, and memory_saving with each invertible one. Reference
# comparisons and gradcheck (test_batchnorm_act) and opcheck
# (test_batchnorm_act_ops) run over this one list.
ACT_CASES = [(a, ms) for a in ACTS for ms in ((False, True) if a in INVERTIBLE else (False,))]
ACT_CASE_IDS = [f"{a}{'-ms' if ms else ''}" for a, ms in ACT_CASES]
CLASSES = {2: bnext.BatchNormAct1d, 3: bnext.BatchNormAct1d, 4: bnext.BatchNormAct2d,
           5: bnext.BatchNormAct3d}
TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
         5: torch.nn.BatchNorm3d}


def act_pair(shape, activation, slope, memory_saving, dtype, pdtype, device, **kw):
    dim = len(shape)
    m = CLASSES[dim](shape[1], activation=activation, negative_slope=slope,
                     memory_saving=memory_saving, device=device, dtype=pdtype, **kw)
    ref = TORCH[dim](shape[1], device=device, dtype=reference_dtype(pdtype), **kw)
    if m.weight is not None:
        with torch.no_grad():
            # Away from 0 so memory_saving can invert, and not all ones.
            m.weight.copy_(torch.rand(shape[1]) + 0.5)
            m.bias.copy_(torch.randn(shape[1]))
            ref.weight.copy_(m.weight)
            ref.bias.copy_(m.bias)
    return m, ref


def compare_act_steps(m, ref, shape, layout, activation, slope, dtype, device, residual, steps=3):
    rdtype = reference_dtype(dtype)
    for step in range(steps + 1):
        training = step < steps
        m.train(training)
        ref.train(training)
        x = make_input(shape, layout, dtype, device).mul_(2).add_(0.5).requires_grad_()
        r = make_input(shape, layout, dtype, device).requires_grad_() if residual else None
        xr = x.detach().to(rdtype).requires_grad_()
        rr = r.detach().to(rdtype).requires_grad_() if residual else None

        y = m(x, r)
        z = ref(xr)
        yr = ACTS[activation](z + rr if residual else z, slope)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert y.stride() == yr.stride() or dtype != rdtype
        assert_close(y, yr)

        dy = torch.randn_like(y)
        y.backward(dy)
        yr.backward(dy.to(rdtype))
        assert_close(x.grad, xr.grad)
        if residual:
            assert_close(r.grad, rr.grad)
        if m.weight is not None:
            assert_close(m.weight.grad, ref.weight.grad)
            assert_close(m.bias.grad, ref.bias.grad)
            for p in (m.weight, m.bias, ref.weight, ref.bias):
                p.grad = None
        if m.running_mean is not None:
            assert_close(m.running_mean, ref.running_mean)
            assert_close(m.running_var, ref.running_var)
            assert m.num_batches_tracked.item() == ref.num_batches_tracked.item()
            if m.running_mean.dtype != ref.running_mean.dtype:
                # A wider reference takes our rounded buffers, so each step
                # checks one step's rounding instead of compounding it.
                with torch.no_grad():
                    ref.running_mean.copy_(m.running_mean)
                    ref.running_var.copy_(m.running_var)
