"""torch.library.opcheck for every op: schema, fake kernels (sizes, strides,
dtypes), autograd registration and aot_dispatch_dynamic."""

import pytest
import torch

from helpers import make_input
from references import SAMPLE_IDS, SAMPLES

ops = torch.ops.bnext

DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64),
          (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]


def _args(shape, layout, dtype, pdtype, device, requires_grad):
    C = shape[1]
    x = make_input(shape, layout, dtype, device).requires_grad_(requires_grad)
    w = torch.rand(C, device=device, dtype=pdtype).requires_grad_(requires_grad)
    b = torch.randn(C, device=device, dtype=pdtype).requires_grad_(requires_grad)
    rm = torch.randn(C, device=device, dtype=pdtype)
    rv = torch.rand(C, device=device, dtype=pdtype) + 0.5
    return x, w, b, rm, rv


@pytest.mark.parametrize("dtypes", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SAMPLES, ids=SAMPLE_IDS)
def test_opcheck_train(shape, layout, dtypes, device):
    x, w, b, _, _ = _args(shape, layout, *dtypes, device, True)
    torch.library.opcheck(ops.batch_norm_train.default, (x, w, b, 1e-5))
    torch.library.opcheck(ops.batch_norm_train.default, (x, None, None, 1e-3))


@pytest.mark.parametrize("dtypes", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SAMPLES, ids=SAMPLE_IDS)
def test_opcheck_eval(shape, layout, dtypes, device):
    x, w, b, rm, rv = _args(shape, layout, *dtypes, device, True)
    torch.library.opcheck(ops.batch_norm_eval.default, (x, rm, rv, w, b, 1e-5))
    torch.library.opcheck(ops.batch_norm_eval.default, (x, rm, rv, None, None, 1e-5))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_opcheck_update_running_stats(momentum, device):
    rm = torch.randn(5, device=device)
    rv = torch.rand(5, device=device)
    mean = torch.randn(5, device=device)
    var = torch.rand(5, device=device)
    nbt = torch.tensor(3, device=device)
    torch.library.opcheck(ops.update_running_stats.default, (rm, rv, mean, var, momentum, nbt))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]], ids=str)
@pytest.mark.parametrize("dtypes", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SAMPLES, ids=SAMPLE_IDS)
def test_opcheck_backward(shape, layout, dtypes, mask, train, device):
    x, w, b, rm, rv = _args(shape, layout, *dtypes, device, False)
    dy = make_input(shape, "contiguous", x.dtype, device)  # layout may differ from x
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = torch.randn(shape[1], device=device, dtype=acc)
    invstd = torch.rand(shape[1], device=device, dtype=acc) + 0.5
    torch.library.opcheck(ops.batch_norm_backward.default,
                          (dy, x, w, rm, rv, mean, invstd, train, 1e-5, mask))
