"""A whole training step under CUDA graphs: torch.compile(mode="reduce-overhead")
and manual torch.cuda.graph capture. Running stats and num_batches_tracked
advance exactly once per replay; the fused memory_saving layer captures too
(its weight check runs on the device). GPU only."""

import copy

import pytest
import torch

import bnext
from conftest import requires_bnext_cuda

pytestmark = requires_bnext_cuda


def _net(momentum, fused=False):
    torch.manual_seed(3)
    bn_act = ([bnext.BatchNormAct2d(8, activation="leaky_relu", negative_slope=0.1,
                                    memory_saving=True, momentum=momentum)] if fused
              else [bnext.BatchNorm2d(8, momentum=momentum), torch.nn.ReLU()])
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), *bn_act, torch.nn.Flatten(),
        torch.nn.Linear(8 * 36, 4),
    ).cuda()


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
def test_reduce_overhead_training_matches_eager(momentum):
    torch._dynamo.reset()
    eager = _net(momentum)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        x = torch.randn(6, 3, 6, 6, device="cuda")
        for m, f, opt in ((eager, eager, opt_e), (model, compiled, opt_c)):
            opt.zero_grad(set_to_none=False)
            f(x).square().mean().backward()
            opt.step()
        for (k, a), b in zip(_state(eager).items(), _state(model).values()):
            torch.testing.assert_close(b, a, msg=f"step {step}: {k}")
    assert model[1].num_batches_tracked.item() == 5


@pytest.mark.parametrize("fused", [False, True], ids=["BatchNorm2d", "BatchNormAct2d-memory_saving"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
def test_graph_captured_training_step(momentum, fused):
    eager = _net(momentum, fused)
    model = copy.deepcopy(eager)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    static_x = torch.randn(6, 3, 6, 6, device="cuda")

    def step(m, o, x):
        o.zero_grad(set_to_none=False)
        loss = m(x).square().mean()
        loss.backward()
        o.step()
        return loss

    # Warm up on a side stream (as the CUDA-graphs docs require), then undo
    # its effects so both models start from the same state.
    start = _state(model)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step(model, opt, static_x)
    torch.cuda.current_stream().wait_stream(s)
    model.load_state_dict(start)

    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(g):
        step(model, opt, static_x)
    # Capture does not execute; the state must be untouched.
    model.load_state_dict(start)

    for replay in range(4):
        x = torch.randn(6, 3, 6, 6, device="cuda")
        static_x.copy_(x)
        g.replay()
        step(eager, opt_e, x)
        torch.cuda.synchronize()
        assert model[1].num_batches_tracked.item() == replay + 1
        for (k, a), b in zip(_state(eager).items(), _state(model).values()):
            torch.testing.assert_close(b, a, msg=f"replay {replay}: {k}")
