"""bnext.SyncBatchNorm on 2, 3 and 4 gloo ranks equals one torch BatchNorm
over the global batch; DDP training equals single-process training."""

import copy

import pytest
import torch
import torch.distributed as dist

import bnext
from conftest import HAS_BNEXT_CUDA
from dist_helpers import run_ranks


def _global_batch(sizes, channels_last):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(sizes), 3, 4, 5, generator=g) * 2 + 3
    dy = torch.randn(sum(sizes), 3, 4, 5, generator=g)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x, dy


def _close(actual, expected):
    torch.testing.assert_close(actual.cpu(), expected.to(actual.dtype))


def _sync_worker(rank, world, sizes, channels_last, momentum, device="cpu"):
    """The reference is torch's BatchNorm2d in float64 over the global batch;
    bnext runs in float32 and must be within float32 tolerance of it. (torch's
    own float32 kernel is not: its weight gradient is ~6e-5 off at step 3,
    where dy has mean 2 and x mean 9, because it reduces in float32.)"""
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ours = bnext.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref)).to(device)
    ref.double()
    assert type(ours) is bnext.SyncBatchNorm
    start = sum(sizes[:rank])
    for step in range(3):
        x, dy = _global_batch(sizes, channels_last)
        x, dy = x * (step + 1), dy + step
        x_dev, dy_dev = x.to(device), dy.to(device)
        xr = x.double().requires_grad_()
        y_ref = ref(xr)
        y_ref.backward(dy.double())

        xl = x_dev[start:start + sizes[rank]].clone().requires_grad_()
        y = ours(xl)
        y.backward(dy_dev[start:start + sizes[rank]])
        _close(y, y_ref[start:start + sizes[rank]])
        assert y.is_contiguous(memory_format=torch.channels_last) == (channels_last and sizes[rank] > 1)
        _close(xl.grad, xr.grad[start:start + sizes[rank]])
        grads = torch.stack([ours.weight.grad, ours.bias.grad])
        dist.all_reduce(grads)  # each rank holds its own share; the sum is the full grad
        _close(grads[0], ref.weight.grad)
        _close(grads[1], ref.bias.grad)
        _close(ours.running_mean, ref.running_mean)
        _close(ours.running_var, ref.running_var)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
        ref.zero_grad()
        ours.zero_grad()
    # Eval: the local path, with the synchronised running stats.
    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, 4, 5)
    _close(ours(x.to(device)), ref(x.double()))


@pytest.mark.parametrize("sizes,channels_last,momentum", [
    ([3, 5], False, 0.1),
    ([4, 0, 3], True, 0.1),       # a rank with an empty batch, channels_last
    ([2, 3, 1, 4], False, None),  # uneven, one rank with a single sample
], ids=["2ranks", "3ranks-empty-rank-cl", "4ranks-momentumNone"])
def test_sync_equals_global_batch_norm(tmp_path, sizes, channels_last, momentum):
    run_ranks(_sync_worker, len(sizes), tmp_path, sizes, channels_last, momentum)


_TORCH_ACT = {"relu": torch.relu, "silu": torch.nn.functional.silu,
              "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.2),
              "gelu": torch.nn.functional.gelu, "identity": lambda z: z}


def _sync_act_worker(rank, world, sizes, channels_last, activation, with_residual):
    """SyncBatchNormAct (converted from BatchNormAct2d) against torch's
    BatchNorm2d + residual + activation in float64 over the global batch."""
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    fused = bnext.BatchNormAct2d(3, activation=activation, negative_slope=0.2)
    fused.load_state_dict(ref.state_dict())
    ours = bnext.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert type(ours) is bnext.SyncBatchNormAct and ours.activation == activation
    ref.double()
    act = _TORCH_ACT[activation]
    start = sum(sizes[:rank])
    for step in range(2):
        x, dy = _global_batch(sizes, channels_last)
        x, dy = x * (step + 1), dy + step
        r = torch.randn(x.shape, generator=torch.Generator().manual_seed(step)).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        xr, rr = x.double().requires_grad_(), r.double().requires_grad_()
        y_ref = act(ref(xr) + rr) if with_residual else act(ref(xr))
        y_ref.backward(dy.double())
        mine = slice(start, start + sizes[rank])
        xl = x[mine].clone().requires_grad_()
        rl = r[mine].clone().requires_grad_() if with_residual else None
        y = ours(xl, rl)
        y.backward(dy[mine])
        _close(y, y_ref[mine])
        _close(xl.grad, xr.grad[mine])
        if with_residual:
            _close(rl.grad, rr.grad[mine])
        grads = torch.stack([ours.weight.grad, ours.bias.grad])
        dist.all_reduce(grads)
        _close(grads[0], ref.weight.grad)
        _close(grads[1], ref.bias.grad)
        _close(ours.running_mean, ref.running_mean)
        _close(ours.running_var, ref.running_var)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
        ref.zero_grad()
        ours.zero_grad()


@pytest.mark.parametrize("sizes,channels_last,activation,with_residual", [
    ([3, 5], False, "relu", True),
    ([4, 0, 3], True, "silu", False),
    ([2, 3, 1, 4], True, "leaky_relu", True),
    ([3, 4], False, "identity", True),
], ids=["2ranks-relu-res", "3ranks-empty-silu-cl", "4ranks-leaky-res-cl", "2ranks-identity-res"])
def test_sync_act_equals_global_batch_norm_act(tmp_path, sizes, channels_last, activation,
                                               with_residual):
    run_ranks(_sync_act_worker, len(sizes), tmp_path, sizes, channels_last, activation,
              with_residual)


@pytest.mark.skipif(not (HAS_BNEXT_CUDA and torch.cuda.device_count() >= 2),
                    reason="needs 2 GPUs and bnext built with CUDA kernels")
def test_sync_nccl(tmp_path):
    run_ranks(_sync_worker, 2, tmp_path, [3, 5], True, 0.1, "cuda", backend="nccl")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).sum((2, 3)))


def _ddp_worker(rank, world):
    # float64, so that the comparison measures the algorithm, not the order
    # of float32 sums (which differs between 1 and 2 ranks).
    torch.manual_seed(0)
    single = _Net().double()
    model = bnext.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(single))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64)
        target = torch.randn(8, 2, generator=g, dtype=torch.float64)
        opt_single.zero_grad()
        (single(x) - target).square().mean().backward()
        opt_single.step()
        opt.zero_grad()
        local, local_target = x.chunk(world)[rank], target.chunk(world)[rank]
        # DDP averages the ranks' gradients: that of the global mean loss.
        (ddp(local) - local_target).square().mean().backward()
        opt.step()
    for (name, a), b in zip(single.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, msg=lambda m, name=name: f"{name}: {m}")


def test_ddp_step_equals_single_process(tmp_path):
    run_ranks(_ddp_worker, 2, tmp_path)


def test_local_path_without_process_group():
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(3)
    ours = bnext.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_converter_keeps_objects_and_skips_custom_forward():
    class Fused(torch.nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2), bnext.BatchNorm2d(3),
                                torch.nn.SyncBatchNorm(4), Fused(5))
    weight = model[1].weight
    out = bnext.SyncBatchNorm.convert_sync_batchnorm(model, process_group=None)
    assert [type(m) for m in out] == [bnext.SyncBatchNorm] * 3 + [Fused]
    acts = torch.nn.Sequential(bnext.BatchNormAct2d(3, activation="silu"),
                               bnext.BatchNormAct2d(3, activation="elu", memory_saving=True))
    acts = bnext.SyncBatchNorm.convert_sync_batchnorm(acts)
    assert [type(m) for m in acts] == [bnext.SyncBatchNormAct, bnext.BatchNormAct2d]
    assert acts[0].activation == "silu"
    assert out[1].weight is weight
    # Not a torch.nn.SyncBatchNorm subclass: DDP refuses those on CPU.
    assert not isinstance(out[0], torch.nn.SyncBatchNorm)
    assert isinstance(out[0], torch.nn.modules.batchnorm._BatchNorm)


def _compile_worker(rank, world, momentum, channels_last, activation):
    torch.manual_seed(0)
    if activation is None:
        eager = bnext.SyncBatchNorm(3, momentum=momentum)
    else:  # the fused module, with a residual
        eager = bnext.SyncBatchNormAct(3, momentum=momentum, activation=activation)
    model = copy.deepcopy(eager)
    # fullgraph: the functional collectives are traced, nothing breaks the graph.
    compiled = torch.compile(model, fullgraph=True)
    g = torch.Generator().manual_seed(rank)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = (torch.randn(rank + 3, 3, 2, 2, generator=g) * (step + 1)).contiguous(memory_format=fmt)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        if activation is None:
            ye, yc = eager(xe), compiled(xc)
        else:
            r = torch.randn(x.shape, generator=g)
            re_, rc = r.clone().requires_grad_(), r.clone().requires_grad_()
            ye, yc = eager(xe, re_), compiled(xc, rc)
        torch.testing.assert_close(yc, ye)
        dy = torch.randn(x.shape, generator=g)
        ye.backward(dy)
        yc.backward(dy)
        torch.testing.assert_close(xc.grad, xe.grad)
        if activation is not None:
            torch.testing.assert_close(rc.grad, re_.grad)
        torch.testing.assert_close(model.weight.grad, eager.weight.grad)
        torch.testing.assert_close(model.bias.grad, eager.bias.grad)
    torch.testing.assert_close(model.running_mean, eager.running_mean)
    torch.testing.assert_close(model.running_var, eager.running_var)
    assert model.num_batches_tracked.item() == eager.num_batches_tracked.item() == 3


@pytest.mark.parametrize("momentum,channels_last,activation",
                         [(0.1, False, None), (None, True, None), (0.1, True, "silu")],
                         ids=["momentum0.1", "momentumNone-cl", "act-silu-residual-cl"])
def test_compile_fullgraph_equals_eager(tmp_path, momentum, channels_last, activation):
    run_ranks(_compile_worker, 2, tmp_path, momentum, channels_last, activation)


def _one_value_worker(rank, world):
    m = bnext.SyncBatchNorm(3)
    x = torch.randn(1, 3) if rank == 0 else torch.empty(0, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(x)
    assert m.num_batches_tracked.item() == 0
    torch.testing.assert_close(m.running_mean, torch.zeros(3))


def test_one_value_over_all_ranks_raises_before_mutation(tmp_path):
    run_ranks(_one_value_worker, 2, tmp_path)
