"""The phase ops (batch_norm_moments, batch_norm_merge_moments,
batch_norm_elemt, batch_norm_backward_reduce, batch_norm_backward_elemt),
driven by one list of sample inputs through:

* a reference check: the batch split into uneven slices (one of them empty),
  each slice's moments merged, normalized and differentiated slice by slice
  with the sums added up, as ranks do, equals torch's BatchNorm over the
  whole batch (output, every gradient, the running-stat inputs);
* ``torch.library.opcheck`` of every phase op;
* ``gradcheck`` of SyncBatchNorm's composition (``sync.synced_batch_norm``)
  on a one-rank gloo group, in float64.
"""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import assert_close, make_input, reference_dtype

ops = torch.ops.bnext

# (shape, layout, input dtype, parameter dtype, activation, with residual)
SAMPLES = [
    ((10, 3), "contiguous", torch.float32, torch.float32, "identity", False),
    ((9, 4, 5), "strided", torch.float64, torch.float64, "relu", True),
    ((7, 3, 4, 5), "contiguous", torch.float32, torch.float32, "silu", False),
    ((7, 3, 4, 5), "channels_last", torch.float32, torch.float32, "leaky_relu", True),
    ((6, 5, 3, 4), "channels_last", torch.bfloat16, torch.float32, "identity", False),
    ((6, 5, 3, 4), "contiguous", torch.float16, torch.float16, "gelu", True),
    ((5, 2, 2, 3, 4), "channels_last", torch.float64, torch.float64, "elu", False),
]
SLICES = [0.4, 0.0, 0.6]  # fractions of the batch per simulated rank

_ACT = {"identity": lambda z: z, "relu": F.relu, "silu": F.silu, "gelu": F.gelu, "elu": F.elu,
        "leaky_relu": lambda z: F.leaky_relu(z, 0.1)}


def _sample_id(s):
    shape, layout, dtype, pdtype, act, res = s
    return f"{'x'.join(map(str, shape))}-{layout}-{str(dtype)[6:]}-{act}{'-res' if res else ''}"


def _make(sample, device):
    shape, layout, dtype, pdtype, act, res = sample
    C = shape[1]
    x = (make_input(shape, layout, torch.float32, device) * 3 + 5).to(dtype)
    dy = make_input(shape, layout, dtype, device)
    r = make_input(shape, layout, dtype, device) if res else None
    w = (torch.rand(C, device=device) + 0.5).to(pdtype)
    b = torch.randn(C, device=device).to(pdtype)
    return x, dy, r, w, b, act


def _bounds(n):
    cuts = [0]
    for f in SLICES:
        cuts.append(min(n, cuts[-1] + round(f * n)))
    cuts[-1] = n
    return list(zip(cuts[:-1], cuts[1:]))


@pytest.mark.parametrize("sample", SAMPLES, ids=_sample_id)
def test_phases_over_slices_equal_torch(sample, device):
    x, dy, r, w, b, act = _make(sample, device)
    eps = 1e-5
    slices = [(x[i:j], dy[i:j], None if r is None else r[i:j]) for i, j in _bounds(x.shape[0])]
    assert any(s[0].shape[0] == 0 for s in slices)

    moments = torch.stack([ops.batch_norm_moments(s[0]) for s in slices])
    mean, invstd, unbiased_var, count = ops.batch_norm_merge_moments(moments, eps)
    outs, grads_x, grads_r = [], [], []
    sums, grad_w, grad_b = 0, 0, 0
    reduced = []
    for xs, dys, rs in slices:
        outs.append(ops.batch_norm_elemt(xs, w, b, mean, invstd, rs, act, 0.1))
        s, gw, gb, gr = ops.batch_norm_backward_reduce(
            dys, xs, mean, invstd, w, b, rs, act, 0.1, [True, True, rs is not None])
        reduced.append(gr)
        sums, grad_w, grad_b = sums + s, grad_w + gw.double(), grad_b + gb.double()
    for (xs, dys, rs), gr in zip(slices, reduced):
        grads_x.append(ops.batch_norm_backward_elemt(
            dys, xs, mean, invstd, w, b, rs, gr, sums, count, act, 0.1))
        grads_r.append(gr)

    # torch over the whole batch, in float32 for half inputs (helpers.reference_dtype).
    rdt = reference_dtype(x.dtype)
    xr = x.to(rdt).requires_grad_()
    wr, br = w.to(rdt).requires_grad_(), b.to(rdt).requires_grad_()
    rr = None if r is None else r.to(rdt).requires_grad_()
    rm, rv = torch.zeros(x.shape[1], dtype=rdt, device=device), torch.ones(x.shape[1], dtype=rdt, device=device)
    z = F.batch_norm(xr, rm, rv, wr, br, True, 1.0, eps)  # momentum 1: running = batch stats
    y = _ACT[act](z if rr is None else z + rr)
    y.backward(dy.to(rdt))

    assert_close(torch.cat(outs), y)
    assert_close(torch.cat(grads_x), xr.grad)
    if rr is not None:
        assert_close(torch.cat(grads_r), rr.grad)
    assert_close(grad_w.to(w.dtype), wr.grad)
    assert_close(grad_b.to(b.dtype), br.grad)
    assert_close(mean.to(rdt), rm)
    assert_close(unbiased_var.to(rdt), rv)
    assert (count == x.numel() // x.shape[1]).all()
    # Each output keeps its slice's memory format, as the single-device ops do.
    assert outs[0].stride() == torch.empty_like(slices[0][0]).stride() or outs[0].numel() == 0


def test_merge_moments_rejects_one_value_per_channel():
    m = torch.stack([ops.batch_norm_moments(torch.randn(1, 3)),
                     ops.batch_norm_moments(torch.empty(0, 3))])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.batch_norm_merge_moments(m, 1e-5)


@pytest.mark.parametrize("sample", SAMPLES, ids=_sample_id)
def test_opcheck_phase_ops(sample, device):
    x, dy, r, w, b, act = _make(sample, device)
    moments = ops.batch_norm_moments(x)
    torch.library.opcheck(ops.batch_norm_moments.default, (x,))
    stack = torch.stack([moments, moments])
    torch.library.opcheck(ops.batch_norm_merge_moments.default, (stack, 1e-5))
    mean, invstd, _, count = ops.batch_norm_merge_moments(stack, 1e-5)
    torch.library.opcheck(ops.batch_norm_elemt.default, (x, w, b, mean, invstd, r, act, 0.1))
    for mask in ([True, True, r is not None], [False, False, r is not None]):
        torch.library.opcheck(ops.batch_norm_backward_reduce.default,
                              (dy, x, mean, invstd, w, b, r, act, 0.1, mask))
    sums, _, _, g = ops.batch_norm_backward_reduce(dy, x, mean, invstd, w, b, r, act, 0.1,
                                                   [False, False, r is not None])
    torch.library.opcheck(ops.batch_norm_backward_elemt.default,
                          (dy, x, mean, invstd, w, b, r, g, sums, count, act, 0.1))


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("activation,with_residual",
                         [("identity", False), ("silu", True), ("elu", False)])
def test_gradcheck_synced_composition(one_rank_group, activation, with_residual):
    from bnext.nn.sync import synced_batch_norm

    x = (torch.randn(4, 3, 2, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True) if with_residual else None

    def fn(x, w, b, r):
        return synced_batch_norm(x, w, b, None, None, None, 0.1, 1e-5, one_rank_group, 1, r,
                                 activation, 0.01)

    torch.autograd.gradcheck(fn, (x, w, b, r))
