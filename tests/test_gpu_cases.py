"""The first-contact cases for a GPU (issue #29), against torch on the same
device: every op (training forward, eval, backward, running stats with
momentum 0.1 and None, num_batches_tracked, fused activations with a
residual, memory_saving, double backward), float32/float16/bfloat16/float64,
contiguous and channels_last, on the shapes where a GPU kernel can go wrong:
statistics split over many blocks, channel counts that are not a multiple of
the pack width, inputs whose storage offset breaks 16-byte alignment, an
empty batch and a float16 tensor of more than 2**31 elements.

Every case runs on the CPU too, in CI, except those marked cuda-only (their
size, or CUDA itself, is the point), so the checks themselves are rehearsed
before GPU time is spent on them; ``python -m benchmarks.gpu_check`` runs this
file and tests/test_cuda_graphs.py (graph capture and replay) on CUDA.

The reference is torch's own batch norm on the same values in float64, on
the same device, rounded to the tested dtype (``helpers.assert_close``).
"""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import bnext
from conftest import requires_bnext_cuda
from helpers import DTYPES, assert_close, dtype_id

CUDA = pytest.param("cuda", marks=requires_bnext_cuda)
BOTH = ["cpu", CUDA]

# (id, shape, layout, devices). "offset" is an input one element into its
# storage: no 16-byte packs for 2-byte and 4-byte dtypes.
CASES = [
    ("nchw-5x7", (4, 6, 5, 7), "contiguous", BOTH),
    ("nhwc-5x7", (4, 6, 5, 7), "channels_last", BOTH),
    ("nchw-C13-odd-planes", (8, 13, 9, 9), "contiguous", BOTH),
    ("nhwc-C13", (8, 13, 9, 9), "channels_last", BOTH),
    ("nhwc-C24-packed", (4, 24, 6, 6), "channels_last", BOTH),
    ("nchw-8x8-packed", (4, 6, 8, 8), "contiguous", BOTH),
    ("nchw-offset", (4, 6, 8, 8), "offset-contiguous", BOTH),
    ("nhwc-offset", (4, 24, 6, 6), "offset-channels_last", BOTH),
    ("NC", (300, 24), "contiguous", BOTH),
    ("NC-C5", (257, 5), "contiguous", BOTH),
    ("NCL", (6, 10, 33), "contiguous", BOTH),
    ("ncdhw-CL3d", (2, 12, 3, 5, 6), "channels_last", BOTH),
    # Many blocks per channel: the grid-split statistics and backward sums,
    # and their float64 merge, with N*H*W = 2**20.
    ("multiblock-C1-nchw", (16, 1, 256, 256), "contiguous", BOTH),
    ("multiblock-C3-nhwc", (16, 3, 256, 256), "channels_last", BOTH),
    ("multiblock-C3-NC", (2**20, 3), "contiguous", BOTH),
    ("multiblock-C64-nchw", (16, 64, 256, 256), "contiguous", [CUDA]),
    ("multiblock-C64-nhwc", (16, 64, 256, 256), "channels_last", [CUDA]),
]


def case_params(cases=CASES):
    return [pytest.param(dev, shape, layout, id=f"{name}-{getattr(dev, 'values', [dev])[0]}",
                         marks=getattr(dev, "marks", ()))
            for name, shape, layout, devices in cases for dev in devices]


def named(what):
    """assert_close's msg: what was compared, then torch's own report."""
    return lambda report: f"{what}: {report}"


def make_input(shape, layout, dtype, device, scale=2.0, shift=0.5):
    """Random values (never zeros) in `layout`; "offset-*" starts one element
    into a larger storage."""
    offset = layout.startswith("offset-")
    layout = layout.removeprefix("offset-")
    numel = 1
    for s in shape:
        numel *= s
    flat = torch.randn(numel + offset, device=device, dtype=torch.float32)
    flat = (flat * scale + shift).to(dtype)
    if layout == "channels_last":
        perm = (0, *range(2, len(shape)), 1)
        stored = [shape[i] for i in perm]
        x = flat[offset:].view(stored).permute(0, len(shape) - 1, *range(1, len(shape) - 1))
    else:
        x = flat[offset:].view(shape)
    assert x.storage_offset() == offset and tuple(x.shape) == tuple(shape)
    return x


def grad_output_for(x, layout):
    """A grad_output with a component along x: grad_weight = sum(dy * x_hat)
    and grad_bias = sum(dy) then grow with the element count instead of
    cancelling to ~sqrt(count). A float32 tolerance is relative, and a sum of
    2**20 float32 products that cancels to near zero is ill-conditioned for
    any kernel (torch's own float32 CPU backward is ~7e-2 off float64 there);
    a cross-block merge that drops or doubles a partial still moves the sums
    by a whole block's share."""
    noise = make_input(x.shape, layout.removeprefix("offset-"), x.dtype, x.device, 1.0, 0.0)
    return noise + 0.25 * x.detach()


def _modules(shape, dtypes, device, momentum, **kw):
    """A bnext BatchNorm*d and torch's, the same parameters; torch's in float64."""
    pdtype = dtypes[1]
    dim = len(shape)
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[dim]
    ours = getattr(bnext, cls)(shape[1], momentum=momentum, device=device, dtype=pdtype, **kw)
    ref = getattr(torch.nn, cls)(shape[1], momentum=momentum, device=device,
                                 dtype=torch.float64, **kw)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(shape[1]) + 0.5)
        ours.bias.copy_(torch.randn(shape[1]))
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    return ours, ref


def _sync_buffers(ours, ref):
    """Compare the buffers, then continue the reference from ours, so that
    each step is checked on its own rather than on drift from low-precision
    buffers."""
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert_close(a, b, msg=named(name))
        with torch.no_grad():
            b.copy_(a)


def _compare_grads(pairs):
    for name, ours, ref in pairs:
        assert ours.dtype != torch.float64 or ref.dtype == torch.float64
        assert_close(ours, ref, msg=named(name))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,shape,layout", case_params())
def test_module_steps(device, shape, layout, dtypes, momentum):
    """Three training steps and an eval step: output, its memory format,
    grad_input/weight/bias, running stats and num_batches_tracked."""
    ours, ref = _modules(shape, dtypes, device, momentum)
    for step in range(4):
        training = step < 3
        ours.train(training)
        ref.train(training)
        x = make_input(shape, layout, dtypes[0], device).requires_grad_()
        xr = x.detach().double().requires_grad_()
        y, yr = ours(x), ref(xr)
        assert y.dtype == x.dtype
        if not layout.startswith("offset"):
            assert y.stride() == yr.stride(), "output memory format differs from torch"
        assert_close(y, yr, msg=named(f"step {step}: output"))
        dy = grad_output_for(x, layout)
        y.backward(dy)
        yr.backward(dy.double())
        _compare_grads([("grad_input", x.grad, xr.grad),
                        ("grad_weight", ours.weight.grad, ref.weight.grad),
                        ("grad_bias", ours.bias.grad, ref.bias.grad)])
        ours.zero_grad()
        ref.zero_grad()
        _sync_buffers(ours, ref)
    assert int(ours.num_batches_tracked) == 3


ACTS = {
    "relu": lambda z: F.relu(z),
    "silu": lambda z: F.silu(z),
    "gelu": lambda z: F.gelu(z),
    "leaky_relu": lambda z: F.leaky_relu(z, 0.1),
    "elu": lambda z: F.elu(z),
}
# (activation, memory_saving, dtypes). memory_saving needs an invertible
# activation, and is checked in float32/float64 only: with a float16/bfloat16
# output, x_hat recovered from it carries the output's rounding divided by
# |weight| (documented), which no fixed tolerance against torch describes.
WIDE_PARAMS = [d for d in DTYPES if d[1] in (torch.float32, torch.float64)]
FUSED = [(act, False, d) for act in ("relu", "silu", "gelu") for d in WIDE_PARAMS]
FUSED += [(act, True, d) for act in ("leaky_relu", "elu") for d in WIDE_PARAMS if d[0] == d[1]]
FUSED_IDS = [f"{a}-ms{int(m)}-{dtype_id(d)}" for a, m, d in FUSED]
FUSED_CASES = [c for c in CASES if c[0].startswith(("nchw-5x7", "nhwc-C13", "nchw-offset",
                                                    "NC-C5", "multiblock-C3", "multiblock-C64"))]


@pytest.mark.parametrize("act,memory_saving,dtypes", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("device,shape,layout", case_params(FUSED_CASES))
def test_fused_residual_steps(device, shape, layout, dtypes, act, memory_saving):
    """BatchNormAct with a residual against torch's unfused BatchNorm + add +
    activation: output, grad_input/residual/weight/bias, running stats, two
    training steps and an eval step."""
    dim = len(shape)
    cls = {2: bnext.BatchNormAct1d, 3: bnext.BatchNormAct1d, 4: bnext.BatchNormAct2d,
           5: bnext.BatchNormAct3d}[dim]
    ours = cls(shape[1], activation=act, negative_slope=0.1, memory_saving=memory_saving,
               device=device, dtype=dtypes[1])
    _, ref = _modules(shape, dtypes, device, 0.1)
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
        ours.bias.copy_(ref.bias)
    for step in range(3):
        training = step < 2
        ours.train(training)
        ref.train(training)
        x = make_input(shape, layout, dtypes[0], device).requires_grad_()
        r = make_input(shape, layout.removeprefix("offset-"), dtypes[0], device, 1.0, 0.0)
        r.requires_grad_()
        xr = x.detach().double().requires_grad_()
        rr = r.detach().double().requires_grad_()
        y = ours(x, r)
        yr = ACTS[act](ref(xr) + rr)
        assert_close(y, yr, msg=named(f"step {step}: output"))
        dy = grad_output_for(x, layout)
        y.backward(dy)
        yr.backward(dy.double())
        _compare_grads([("grad_input", x.grad, xr.grad), ("grad_residual", r.grad, rr.grad),
                        ("grad_weight", ours.weight.grad, ref.weight.grad),
                        ("grad_bias", ours.bias.grad, ref.bias.grad)])
        ours.zero_grad()
        ref.zero_grad()
        _sync_buffers(ours, ref)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", BOTH)
def test_double_backward_matches_torch(device, training, layout):
    """Second derivatives (grad of grad_input . v w.r.t. input, weight,
    bias and grad_output) equal torch's, float64."""
    shape = (4, 6, 5, 7)
    ours, ref = _modules(shape, (torch.float64, torch.float64), device, 0.1)
    ours.train(training)
    ref.train(training)
    x = make_input(shape, layout, torch.float64, device)
    dy = make_input(shape, layout, torch.float64, device, 1.0, 0.0)
    v = make_input(shape, layout, torch.float64, device, 1.0, 0.0)
    results = []
    for m in (ours, ref):
        xi = x.detach().clone().requires_grad_()
        dyi = dy.detach().clone().requires_grad_()
        (gx,) = torch.autograd.grad(m(xi), xi, dyi, create_graph=True)
        results.append(torch.autograd.grad((gx * v).sum(), [xi, m.weight, m.bias, dyi],
                                           allow_unused=True))
    for name, a, b in zip(["input", "weight", "bias", "grad_output"], *results):
        if b is None:
            assert a is None or not a.any(), name
        else:
            assert_close(a, b, msg=named(name))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", BOTH)
def test_empty_batch(device, layout, momentum):
    """N = 0: an empty output and empty gradients, running stats as torch
    leaves them."""
    shape = (0, 6, 5, 5)
    ours, ref = _modules(shape, (torch.float32, torch.float32), device, momentum)
    x = make_input(shape, layout, torch.float32, device).requires_grad_()
    xr = x.detach().double().requires_grad_()
    y, yr = ours(x), ref(xr)
    assert y.shape == x.shape
    y.sum().backward()
    yr.sum().backward()
    assert x.grad.shape == x.shape
    _compare_grads([("grad_weight", ours.weight.grad, ref.weight.grad),
                    ("grad_bias", ours.bias.grad, ref.bias.grad)])
    _sync_buffers(ours, ref)


# ------------------------------------------------------------ CUDA only

@requires_bnext_cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_float16_over_2_31_elements(layout):
    """A float16 tensor of 2049 x 4 x 512 x 512 > 2**31 elements: offsets
    past int32, in both layouts; training forward and backward against
    torch's own float16 batch norm, compared in slices (whole-tensor
    temporaries would need tens of GB)."""
    shape = (2049, 4, 512, 512)
    torch.cuda.empty_cache()
    x = make_input(shape, layout, torch.float16, "cuda").requires_grad_()
    assert x.numel() > 2**31
    w = torch.rand(4, device="cuda") + 0.5
    b = torch.randn(4, device="cuda")
    y = bnext.functional.batch_norm(x, None, None, w.requires_grad_(), b.requires_grad_(), True)
    xr = x.detach().requires_grad_()
    wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    yr = F.batch_norm(xr, None, None, wr, br, True)
    for i in range(0, shape[0], 128):
        assert_close(y[i:i + 128], yr[i:i + 128], msg=named(f"output rows {i}:{i + 128}"))
    del yr
    dy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, [x, w, b], dy)
    del y
    gxr, gwr, gbr = torch.autograd.grad(F.batch_norm(xr, None, None, wr, br, True), [xr, wr, br], dy)
    for i in range(0, shape[0], 128):
        assert_close(gx[i:i + 128], gxr[i:i + 128], msg=named(f"grad_input rows {i}:{i + 128}"))
    # Both sum 5e8 products per channel in float32 in different orders.
    torch.testing.assert_close(gw, gwr, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(gb, gbr, rtol=1e-4, atol=1e-2)


@requires_bnext_cuda
@pytest.mark.parametrize("fused", [False, True], ids=["BatchNorm2d", "BatchNormAct2d-memory_saving"])
def test_cuda_training_step_never_synchronizes(fused):
    """Forward, backward and running-stat update with torch's sync debug mode
    set to error: no .item(), no device-to-host copy."""
    bn = (bnext.BatchNormAct2d(8, activation="elu", memory_saving=True, momentum=None)
          if fused else bnext.BatchNorm2d(8, momentum=None))
    bn = bn.cuda()
    x = torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True)
    bn(x).sum().backward()  # first call outside: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            bn(x).sum().backward()
        bn.eval()
        with torch.no_grad():
            bn(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_bnext_cuda
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
def test_cuda_compile_fullgraph(momentum):
    """torch.compile(fullgraph=True) of a conv + BN + fused BN-act network on
    CUDA equals eager over three training steps, buffers included."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    eager = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), bnext.BatchNorm2d(16, momentum=momentum),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        bnext.BatchNormAct2d(16, activation="relu", momentum=momentum),
    ).cuda()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    for step in range(3):
        x = torch.randn(8, 3, 16, 16, device="cuda")
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, msg=named(f"step {step}: output"))
        ye.square().mean().backward()
        yc.square().mean().backward()
        for (k, a), b in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, msg=named(f"step {step}: {k}.grad"))
        for (k, a), b in zip(eager.named_buffers(), model.buffers()):
            torch.testing.assert_close(b, a, msg=named(f"step {step}: {k}"))
        eager.zero_grad()
        model.zero_grad()


ZERO_WEIGHT_SCRIPT = textwrap.dedent("""
    import torch, bnext
    bn = bnext.BatchNormAct2d(4, activation="elu", memory_saving=True).cuda()
    with torch.no_grad():
        bn.weight[2] = 0
    y = bn(torch.randn(2, 4, 3, 3, device="cuda"))
    torch.cuda.synchronize()
    print("NO ERROR")
""")


@requires_bnext_cuda
def test_cuda_memory_saving_zero_weight_is_a_device_assert():
    """A zero weight under memory_saving is an argument error found on the
    device (no host sync): a device-side assert naming the cause, which ends
    the CUDA context, hence a subprocess."""
    proc = subprocess.run([sys.executable, "-c", ZERO_WEIGHT_SCRIPT], capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR" not in out, out
    assert "device-side assert" in out and "memory_saving" in out, out

