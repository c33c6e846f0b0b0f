"""The built extension on older x86-64 CPUs, emulated by qemu-user: under
`-cpu Haswell` (AVX2, no AVX-512) bnext loads its avx2 kernels, under
`-cpu Nehalem` (no AVX) its default ones, and both give torch's results
(train, eval, backward; NCHW, channels_last, (N, C); float32, bfloat16)
instead of dying with SIGILL. .ci/run installs qemu-user where it is
missing; emulation makes each run take tens of seconds."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QEMU = shutil.which("qemu-x86_64")

SCRIPT = r"""
import sys
import torch, torch.nn.functional as F
import bnext
from bnext import _cpu_capability

level = bnext.get_cpu_capability()
assert level == sys.argv[1], (level, sys.argv[1], torch.backends.cpu.get_cpu_capability())
torch.manual_seed(0)
cases = [((4, 13, 5, 7), None, torch.float32), ((4, 13, 5, 7), torch.channels_last, torch.float32),
         ((4, 24, 6, 6), torch.channels_last, torch.bfloat16), ((40, 10), None, torch.float32)]
for shape, fmt, dtype in cases:
    C = shape[1]
    w = (torch.rand(C) + 0.5).requires_grad_()
    b = torch.randn(C).requires_grad_()
    x = torch.randn(shape) * 2 + 0.5
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x = x.to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)
    rm, rv = torch.zeros(C), torch.ones(C)
    rm2, rv2 = rm.clone().double(), rv.clone().double()
    y = bnext.functional.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = F.batch_norm(xr, rm2, rv2, wr, br, True, 0.1, 1e-5)
    torch.testing.assert_close(y, yr.to(dtype))
    torch.testing.assert_close(rm, rm2.float())
    torch.testing.assert_close(rv, rv2.float())
    g = torch.autograd.grad(y, [x, w, b], dy)
    gr = torch.autograd.grad(yr, [xr, wr, br], dy.double())
    for a, r in zip(g, gr):
        torch.testing.assert_close(a, r.to(a.dtype))
    ye = bnext.functional.batch_norm(x.detach(), rm, rv, w.detach(), b.detach(), False)
    yre = F.batch_norm(x.detach().double(), rm.double(), rv.double(), w.detach().double(),
                       b.detach().double(), False)
    torch.testing.assert_close(ye, yre.to(dtype))
    res = torch.randn(shape).to(dtype)
    yf = bnext.functional.batch_norm_act(x.detach(), None, None, w.detach(), b.detach(), True,
                                         residual=res, activation="relu")
    yfr = F.relu(F.batch_norm(x.detach().double(), None, None, w.detach().double(),
                              b.detach().double(), True) + res.double())
    torch.testing.assert_close(yf, yfr.to(dtype))
print("OK", level)
"""


@pytest.mark.skipif(QEMU is None, reason="needs qemu-x86_64 (apt-get install qemu-user; .ci/run does)")
@pytest.mark.parametrize("cpu,level", [("Haswell", "avx2"), ("Nehalem", "default")])
def test_runs_on_older_cpu(cpu, level):
    proc = subprocess.run([QEMU, "-cpu", cpu, sys.executable, "-c", SCRIPT, level],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    errors = "\n".join(l for l in proc.stderr.splitlines() if "TCG doesn't support" not in l)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{errors}"
    assert proc.stdout.strip().endswith(f"OK {level}")
