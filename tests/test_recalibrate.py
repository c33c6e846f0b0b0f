"""recalibrate_batchnorm against statistics computed directly from the
concatenated inputs of each BN (with earlier BNs already recalibrated)."""

import copy
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnext


def _model(bn=nn):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), bn.BatchNorm2d(6, momentum=0.3), nn.ReLU(),
        nn.Conv2d(6, 4, 1), bnext.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 16, 5),
        nn.BatchNorm1d(5),
    )


def _batches(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 6, 6, generator=g) * 3 + 2 for n in sizes]


def _reference_stats(model, batches):
    """Mean and unbiased variance of each BN's input over the concatenated
    batches, BN by BN, each computed with the earlier BNs recalibrated."""
    model = copy.deepcopy(model).eval()
    x = torch.cat(batches)
    stats = []
    with torch.no_grad():
        h = x
        for layer in model:
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                dims = [0] + list(range(2, h.dim()))
                mean = h.to(torch.float64).mean(dims)
                var = h.to(torch.float64).var(dims, unbiased=True)
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                stats.append((mean.float(), var.float()))
            h = layer(h)
    return stats


def _bn_stats(model):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("as_tuples", [False, True], ids=["tensors", "tuples"])
def test_matches_concatenated_statistics(as_tuples):
    model = _model()
    model.train()
    for x in _batches([8, 8], seed=5):  # running stats that differ from the truth
        model(x)
    batches = _batches([5, 7, 3])
    expected = _reference_stats(model, batches)
    data = [(x, torch.zeros(len(x))) for x in batches] if as_tuples else batches
    nbt = model[1].num_batches_tracked.clone()
    out = bnext.recalibrate_batchnorm(model, iter(data))
    assert out is model
    for (mean, var), (em, ev) in zip(_bn_stats(model), expected):
        torch.testing.assert_close(mean, em)
        torch.testing.assert_close(var, ev)
    assert model.training and all(m.training for m in model.modules())
    assert model[1].momentum == 0.3 and model[1].num_batches_tracked == nbt


def test_num_batches_and_modes_restored():
    model = _model(bnext)
    model.eval()
    model[2].train()  # a mixed-mode model comes back exactly as it was
    batches = _batches([4, 6, 5, 9])
    bnext.recalibrate_batchnorm(model, batches, num_batches=2)
    expected = _reference_stats(model, batches[:2])
    for (mean, var), (em, ev) in zip(_bn_stats(model), expected):
        torch.testing.assert_close(mean, em)
        torch.testing.assert_close(var, ev)
    assert not model.training and model[2].training and not model[1].training


def test_large_mean_is_stable():
    """Inputs with mean 1e4 times their standard deviation: the merged
    variance stays exact (no E[x^2] - E[x]^2 cancellation)."""
    bn = nn.BatchNorm1d(3)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, generator=g, dtype=torch.float64) + 1e4 for n in (7, 9, 4)]
    bn = bn.double()
    bnext.recalibrate_batchnorm(bn, batches)
    x = torch.cat(batches)
    torch.testing.assert_close(bn.running_mean, x.mean(0))
    torch.testing.assert_close(bn.running_var, x.var(0))


def test_shared_bn_sees_every_call():
    bn = nn.BatchNorm1d(2)
    model = nn.ModuleList([bn])

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, x):
            return self.bn(self.bn(x) * 2 + 5)

    m = Twice()
    batches = [torch.randn(6, 2) for _ in range(2)]
    bnext.recalibrate_batchnorm(m, batches)
    assert torch.isfinite(bn.running_mean).all()
    # Its inputs are the raw batches and, at the second call, 2*bn(x)+5 with
    # the final statistics; the mean over all of them is between the two.
    assert model[0].running_mean.gt(0).all()


def test_empty_data_raises():
    with pytest.raises(ValueError, match="no batch"):
        bnext.recalibrate_batchnorm(_model(), [])


def _worker(rank, world, init_file, out_dir, sizes_per_rank):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model = _model()
        batches = _batches(sizes_per_rank[rank], seed=10 + rank) if sizes_per_rank[rank] else []
        if not batches:  # a rank with no samples still takes part
            batches = [torch.empty(0, 3, 6, 6)]
        bnext.recalibrate_batchnorm(model, batches)
        if rank == 0:
            torch.save(_bn_stats(model), os.path.join(out_dir, "stats.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes_per_rank", [[[5, 3], [4]], [[6], [], [2, 3]]],
                         ids=["2ranks-uneven", "3ranks-one-empty"])
def test_distributed_gloo(tmp_path, sizes_per_rank):
    world = len(sizes_per_rank)
    ctx = mp.start_processes(_worker, args=(world, str(tmp_path / "init"), str(tmp_path),
                                            sizes_per_rank),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed recalibration timed out")
    got = torch.load(tmp_path / "stats.pt")
    all_batches = [b for r, s in enumerate(sizes_per_rank) if s for b in _batches(s, seed=10 + r)]
    expected = _reference_stats(_model(), all_batches)
    for (mean, var), (em, ev) in zip(got, expected):
        torch.testing.assert_close(mean, em)
        torch.testing.assert_close(var, ev)
