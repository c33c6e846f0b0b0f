"""The CPU kernels' instruction-set levels (bnext/_cpu_capability.py): every
level built and runnable here against torch, forced in-process; the choice
made at import and its overrides; the torch-version check."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bnext
from bnext import _cpu_capability as cpu
from bnext._build import check_torch_version
from helpers import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNABLE = [level for level in cpu.built_levels()
            if cpu.LEVELS.index(level) <= cpu.LEVELS.index(cpu.supported_level())]


@pytest.fixture(params=RUNNABLE)
def level(request):
    before = bnext.get_cpu_capability()
    assert cpu.set_level(request.param) == request.param
    yield request.param
    cpu.set_level(before)


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4
                            else torch.channels_last_3d)
    return t


# Vector tails in every walk: odd planes, channel counts off the pack width.
CASES = [
    ((5, 13, 7, 9), "contiguous", torch.float32),
    ((5, 13, 7, 9), "channels_last", torch.float32),
    ((4, 24, 6, 6), "channels_last", torch.bfloat16),
    ((4, 6, 8, 8), "contiguous", torch.bfloat16),
    ((300, 19), "contiguous", torch.float32),
    ((3, 20, 33), "contiguous", torch.float64),
    ((2, 12, 3, 5, 6), "channels_last", torch.float16),
]


@pytest.mark.parametrize("shape,layout,dtype", CASES, ids=str)
def test_level_matches_torch(level, shape, layout, dtype):
    """Two training steps and an eval step of BatchNorm*d at this level:
    output, every gradient and the running stats against torch in float64."""
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours = getattr(bnext, cls)(shape[1], dtype=pdtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    ref = bnext.revert_batchnorm(copy.deepcopy(ours)).double()
    for step in range(3):
        ours.train(step < 2)
        ref.train(step < 2)
        x = _layout(torch.randn(shape) * 2 + 0.5, layout).to(dtype).requires_grad_()
        xr = x.detach().double().requires_grad_()
        y, yr = ours(x), ref(xr)
        assert_close(y, yr)
        dy = torch.randn(shape).to(dtype) + 0.25 * x.detach()
        y.backward(dy)
        yr.backward(dy.double())
        assert_close(x.grad, xr.grad)
        assert_close(ours.weight.grad, ref.weight.grad)
        assert_close(ours.bias.grad, ref.bias.grad)
        assert_close(ours.running_mean, ref.running_mean)
        assert_close(ours.running_var, ref.running_var)
        ours.zero_grad()
        ref.zero_grad()


@pytest.mark.parametrize("act,memory_saving", [("relu", False), ("silu", False), ("leaky_relu", True)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_level_fused_matches_torch(level, layout, act, memory_saving):
    """BatchNormAct2d with a residual at this level against torch's BN + add
    + activation in float64: output, grad_input/residual/weight/bias."""
    shape = (4, 13, 7, 9)
    ours = bnext.BatchNormAct2d(13, activation=act, negative_slope=0.1, memory_saving=memory_saving)
    ref = torch.nn.BatchNorm2d(13).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    fn = {"relu": F.relu, "silu": F.silu, "leaky_relu": lambda z: F.leaky_relu(z, 0.1)}[act]
    x = _layout(torch.randn(shape) * 2 + 0.5, layout).requires_grad_()
    r = _layout(torch.randn(shape), layout).requires_grad_()
    xr, rr = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    y, yr = ours(x, r), fn(ref(xr) + rr)
    assert_close(y, yr)
    dy = torch.randn(shape) + 0.25 * x.detach()
    y.backward(dy)
    yr.backward(dy.double())
    for a, b in ((x.grad, xr.grad), (r.grad, rr.grad), (ours.weight.grad, ref.weight.grad),
                 (ours.bias.grad, ref.bias.grad)):
        assert_close(a, b)


def test_import_loads_the_best_runnable_level():
    assert bnext.get_cpu_capability() == RUNNABLE[-1]


def test_default_build_is_the_portable_one(monkeypatch):
    """setup.py builds every level unless BNEXT_CPU_LEVELS asks for fewer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bnext_setup", os.path.join(ROOT, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # setup() itself runs only as __main__
    monkeypatch.delenv("BNEXT_CPU_LEVELS", raising=False)
    assert setup.build_levels() == list(cpu.LEVELS)
    monkeypatch.setenv("BNEXT_CPU_LEVELS", "native")
    assert setup.build_levels() == [setup.native_level()]
    monkeypatch.setenv("BNEXT_CPU_LEVELS", "avx2,default")
    assert setup.build_levels() == ["default", "avx2"]


def test_set_level_refuses_a_level_above_the_ceiling(monkeypatch):
    monkeypatch.setenv("BNEXT_CPU_CAPABILITY", "default")
    with pytest.raises(ValueError, match="cannot run here"):
        cpu.set_level("avx2")
    with pytest.raises(ValueError, match="must be one of"):
        monkeypatch.setenv("BNEXT_CPU_CAPABILITY", "sse9")
        cpu.supported_level()


def _capability_in_subprocess(**env):
    proc = subprocess.run(
        [sys.executable, "-c", "import bnext; print(bnext.get_cpu_capability())"],
        env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT, timeout=300)
    return proc.returncode, proc.stdout.strip(), proc.stderr


@pytest.mark.parametrize("env,expected", [
    ({"BNEXT_CPU_CAPABILITY": "avx2"}, "avx2"),
    ({"BNEXT_CPU_CAPABILITY": "default"}, "default"),
    ({"ATEN_CPU_CAPABILITY": "default"}, "default"),
    ({"ATEN_CPU_CAPABILITY": "avx2", "BNEXT_CPU_CAPABILITY": "avx512_bf16"}, "avx2"),
], ids=["bnext-avx2", "bnext-default", "aten-default", "bnext-cannot-raise"])
def test_overrides_only_lower_the_level(env, expected):
    """BNEXT_CPU_CAPABILITY lowers the level and never raises it above
    torch's (ATEN_CPU_CAPABILITY lowers torch's own)."""
    if "avx2" not in RUNNABLE and expected == "avx2":
        pytest.skip("this CPU has no AVX2")
    rc, out, err = _capability_in_subprocess(**env)
    assert rc == 0, err
    assert out == expected


def test_unknown_override_fails_at_import():
    rc, _, err = _capability_in_subprocess(BNEXT_CPU_CAPABILITY="sse9")
    assert rc != 0 and "BNEXT_CPU_CAPABILITY must be one of" in err


def test_torch_version_check():
    check_torch_version("2.13.0+cu130", "2.13.0+cpu")  # one release: same C++ ABI
    with pytest.raises(ImportError, match=r"built against torch 2\.13\.0\+cpu but torch 2\.14\.1 is"):
        check_torch_version("2.14.1", "2.13.0+cpu")


def test_import_under_another_torch_is_a_clear_error():
    """A bnext built for one torch, imported under another: ImportError
    naming both, before any compiled library is loaded."""
    script = "import torch; torch.__version__ = '2.99.0'; import bnext"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "2.99.0" in proc.stderr
    assert torch.__version__.split("+")[0] in proc.stderr
