"""bnext modules under torch.compile(fullgraph=True) with inductor equal eager,
running stats included, and do not recompile across training steps."""

import copy

import pytest
import torch
import torch._dynamo

import bnext


class Net(torch.nn.Module):
    def __init__(self, momentum=0.1, track=True, affine=True, bn=bnext):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn2 = bn.BatchNorm2d(8, momentum=momentum, track_running_stats=track, affine=affine)
        self.bn1 = bn.BatchNorm1d(8, momentum=momentum, track_running_stats=track, affine=affine)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv(x)))
        return self.fc(self.bn1(x.mean((2, 3))))


def _grads(m):
    return [p.grad.clone() for p in m.parameters()]


def _buffers(m):
    return [b.clone() for b in m.buffers()]


def _assert_step_matches(eager, compiled_model, compiled, x, loss):
    """One training step on both models: outputs, every gradient and every
    buffer equal."""
    ye, yc = eager(x), compiled(x)
    torch.testing.assert_close(yc, ye)
    loss(ye).backward()
    loss(yc).backward()
    for ge, gc in zip(_grads(eager), _grads(compiled_model)):
        torch.testing.assert_close(gc, ge)
    for be, bc in zip(_buffers(eager), _buffers(compiled_model)):
        torch.testing.assert_close(bc, be)
    eager.zero_grad()
    compiled_model.zero_grad()


CONFIGS = [(0.1, True, True), (None, True, True), (0.1, False, True), (0.1, True, False),
           (None, False, False)]
CONFIG_IDS = ["momentum0.1", "momentumNone", "notrack", "noaffine", "momentumNone-notrack-noaffine"]


@pytest.mark.parametrize("momentum,track,affine", CONFIGS, ids=CONFIG_IDS)
def test_compile_fullgraph_matches_eager(momentum, track, affine, device):
    torch._dynamo.reset()
    eager = Net(momentum, track, affine).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="inductor")

    counters = torch._dynamo.utils.counters
    counters.clear()
    for step in range(3):
        x = torch.randn(4, 3, 6, 6, device=device)
        _assert_step_matches(eager, compiled_model, compiled, x, lambda y: y.square().sum())
    assert counters["stats"]["unique_graphs"] == 1, "recompiled across training steps"

    eager.eval()
    compiled_model.eval()
    x = torch.randn(4, 3, 6, 6, device=device)
    torch.testing.assert_close(compiled(x), eager(x))


def test_compile_uses_bnext_ops(device):
    """The compiled graph calls bnext's ops rather than decomposing to aten BN."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    m = bnext.BatchNorm2d(4).to(device)
    f = torch.compile(m, fullgraph=True)
    _, code = run_and_get_code(f, torch.randn(2, 4, 3, 3, device=device))
    src = "\n".join(code)
    # Traced through batch_norm_train_step's autograd kernel: the training op
    # and the buffer update, both bnext's.
    assert "bnext.batch_norm_train" in src and "bnext.update_running_stats" in src
    assert "native_batch_norm" not in src


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
def test_compile_dynamic_batch_sizes_one_graph(momentum, device):
    """dynamic=True: changing batch sizes, train and eval, reuse one graph per
    mode, and every step equals eager (outputs, gradients, buffers)."""
    torch._dynamo.reset()
    eager = Net(momentum).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    # The first batch size differs from every other dim, or duck sizing would
    # tie it to the channel count and specialize it.
    for n in (5, 8, 3, 6, 11):
        x = torch.randn(n, 3, 6, 6, device=device)
        _assert_step_matches(eager, compiled_model, compiled, x, lambda y: y.sum())
    assert counters["stats"]["unique_graphs"] == 1, "recompiled for a new batch size"
    eager.eval()
    compiled_model.eval()
    for n in (2, 7, 4):
        x = torch.randn(n, 3, 6, 6, device=device)
        torch.testing.assert_close(compiled(x), eager(x))
    assert counters["stats"]["unique_graphs"] == 2, "eval recompiled for a new batch size"


def test_momentum_none_fullgraph_where_torch_fails(device):
    """bnext does better than torch here: torch 2.13's own BatchNorm with
    momentum=None breaks fullgraph compilation (a data-dependent guard on
    1 / num_batches_tracked, pytorch/pytorch#194504); bnext computes that
    factor inside its update op and compiles to one graph."""
    torch._dynamo.reset()
    x = torch.randn(4, 3, 6, 6, device=device)
    torch_model = torch.compile(Net(None, bn=torch.nn).to(device), fullgraph=True)
    with pytest.raises(Exception):
        torch_model(x)
    torch._dynamo.reset()
    bnext_model = torch.compile(Net(None).to(device), fullgraph=True)
    bnext_model(x)
