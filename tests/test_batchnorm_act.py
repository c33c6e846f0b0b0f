"""Fused BatchNormAct against the unfused torch ops: BatchNorm, + residual,
activation. Outputs, every gradient (input, residual, weight, bias), running
stats and num_batches_tracked over several steps, then eval."""

import pytest
import torch

import bnext
from helpers import assert_close
from references import ACT_CASE_IDS, ACT_CASES, ACTS, act_pair, compare_act_steps


@pytest.mark.parametrize("activation,memory_saving", ACT_CASES, ids=ACT_CASE_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_unfused_torch(activation, memory_saving, residual, layout, dtype, device):
    shape = (4, 6, 5, 7)
    slope = 0.2
    m, ref = act_pair(shape, activation, slope, memory_saving, dtype, dtype, device)
    compare_act_steps(m, ref, shape, layout, activation, slope, dtype, device, residual)


@pytest.mark.parametrize("shape", [(16, 6), (4, 6, 9), (2, 6, 3, 4, 5)], ids=["2d", "3d", "5d"])
@pytest.mark.parametrize("activation,memory_saving",
                         [("relu", False), ("gelu", False), ("leaky_relu", True), ("elu", True)])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_other_ranks(shape, activation, memory_saving, residual, device):
    layout = "channels_last" if len(shape) == 5 else "contiguous"
    m, ref = act_pair(shape, activation, 0.01, memory_saving, torch.float32, torch.float32, device)
    compare_act_steps(m, ref, shape, layout, activation, 0.01, torch.float32, device, residual)


@pytest.mark.parametrize("options", [
    dict(momentum=None), dict(track_running_stats=False), dict(affine=False),
    dict(momentum=None, affine=False),
], ids=["cumulative", "untracked", "no-affine", "cumulative-no-affine"])
@pytest.mark.parametrize("memory_saving", [False, True])
def test_options(options, memory_saving, device):
    shape = (4, 6, 5, 5)
    m, ref = act_pair(shape, "leaky_relu", 0.1, memory_saving, torch.float32, torch.float32,
                   device, **options)
    compare_act_steps(m, ref, shape, "contiguous", "leaky_relu", 0.1, torch.float32, device, True)


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float32)],
                         ids=["bf16-f32params", "bf16", "f16-f32params"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_reduced_precision(activation, dtypes, layout, device):
    """Half inputs against torch on the same values in float32, rounded."""
    dtype, pdtype = dtypes
    shape = (4, 6, 5, 7)
    m, ref = act_pair(shape, activation, 0.01, False, dtype, pdtype, device)
    compare_act_steps(m, ref, shape, layout, activation, 0.01, dtype, device, True)


@pytest.mark.parametrize("activation,memory_saving", ACT_CASES, ids=ACT_CASE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(activation, memory_saving, training, device):
    kw = dict(device=device, dtype=torch.float64)
    x = torch.randn(3, 4, 2, 3, **kw).requires_grad_()
    r = torch.randn(3, 4, 2, 3, **kw).requires_grad_()
    w = (torch.rand(4, **kw) + 0.5).requires_grad_()
    b = torch.randn(4, **kw).requires_grad_()
    rm, rv = torch.randn(4, **kw), torch.rand(4, **kw) + 0.5

    def fn(x, r, w, b):
        return bnext.functional.batch_norm_act(
            x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, residual=r,
            activation=activation, negative_slope=0.3, memory_saving=memory_saving)

    torch.autograd.gradcheck(fn, (x, r, w, b))
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    torch.autograd.gradcheck(fn, (x_cl, r, w, b))
    torch.autograd.gradcheck(lambda x, w, b: fn(x, None, w, b), (x, w, b))


def test_double_backward_raises():
    m = bnext.BatchNormAct2d(3, activation="silu")
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).sum(), x, create_graph=False)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(m(x).sum(), x, create_graph=True)


@pytest.mark.parametrize("memory_saving", [False, True])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_compile_fullgraph_equals_eager(memory_saving, residual):
    shape = (4, 6, 5, 5)
    eager, _ = act_pair(shape, "leaky_relu", 0.1, memory_saving, torch.float32, torch.float32, "cpu")
    compiled_mod, _ = act_pair(shape, "leaky_relu", 0.1, memory_saving, torch.float32, torch.float32, "cpu")
    compiled_mod.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_mod, fullgraph=True)
    for step in range(4):
        training = step < 3
        eager.train(training)
        compiled_mod.train(training)
        x = torch.randn(shape, requires_grad=True)
        r = torch.randn(shape, requires_grad=True) if residual else None
        x2 = x.detach().clone().requires_grad_()
        r2 = r.detach().clone().requires_grad_() if residual else None
        y, y2 = eager(x, r), compiled(x2, r2)
        assert_close(y2, y)
        dy = torch.randn_like(y)
        y.backward(dy)
        y2.backward(dy)
        assert_close(x2.grad, x.grad)
        if residual:
            assert_close(r2.grad, r.grad)
        for a, b in ((eager.weight, compiled_mod.weight), (eager.bias, compiled_mod.bias)):
            assert_close(b.grad, a.grad)
            a.grad = b.grad = None
        for k, v in eager.state_dict().items():
            assert_close(compiled_mod.state_dict()[k], v)


def test_state_dict_round_trip_with_torch_bn():
    ref = torch.nn.BatchNorm2d(5)
    ref(torch.randn(4, 5, 3, 3))
    m = bnext.BatchNormAct2d(5, activation="relu")
    m.load_state_dict(ref.state_dict())
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(m.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert isinstance(m, torch.nn.BatchNorm2d)


def test_repr():
    r = repr(bnext.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2, memory_saving=True))
    assert "activation='leaky_relu'" in r and "negative_slope=0.2" in r and "memory_saving=True" in r
