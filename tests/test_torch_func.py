"""torch.func over bnext modules: functional_call, grad and vmap work wherever
torch's BatchNorm does, with equal results, and fail where torch's fails."""

import pytest
import torch
from torch.func import functional_call, grad, vmap

import bnext

CASES = [(m, t, tr) for m in (0.1, None) for t in (True, False) for tr in (True, False)]
IDS = [f"mom{m}-{'track' if t else 'notrack'}-{'train' if tr else 'eval'}" for m, t, tr in CASES]


def _pair(momentum, track, training, device):
    mods = []
    for cls in (torch.nn.BatchNorm2d, bnext.BatchNorm2d):
        torch.manual_seed(1)
        m = cls(3, momentum=momentum, track_running_stats=track, device=device).train(training)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
            if track:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        mods.append(m)
    return mods


def _outcome(fn):
    try:
        return fn()
    except RuntimeError as e:
        return e


def _same_outcome(ref, got):
    if isinstance(ref, Exception):
        assert isinstance(got, Exception), f"torch fails ({ref}) but bnext returned a value"
        return
    assert not isinstance(got, Exception), f"torch works but bnext raised: {got}"
    torch.testing.assert_close(got, ref)


def _buffers(m, stack=None):
    bufs = {k: v.clone() for k, v in m.named_buffers()}
    if stack:
        bufs = {k: torch.stack([v] * stack) for k, v in bufs.items()}
    return bufs


@pytest.mark.parametrize("momentum,track,training", CASES, ids=IDS)
def test_functional_call_and_grad(momentum, track, training, device):
    x = torch.randn(4, 3, 5, 5, device=device)

    def run(m):
        params = dict(m.named_parameters())
        bufs = _buffers(m)
        out = functional_call(m, {**params, **bufs}, (x,))
        g = grad(lambda p, b: functional_call(m, {**p, **b}, (x,)).square().sum())(params, bufs)
        return out, g, bufs

    ref, got = (_outcome(lambda m=m: run(m)) for m in _pair(momentum, track, training, device))
    _same_outcome(ref, got)


@pytest.mark.parametrize("momentum,track,training", CASES, ids=IDS)
def test_vmap_with_batched_buffers(momentum, track, training, device):
    xs = torch.randn(3, 4, 3, 5, 5, device=device)

    def run(m):
        params = dict(m.named_parameters())
        bufs = _buffers(m, stack=3)
        out = vmap(lambda b, x: functional_call(m, {**params, **b}, (x,)))(bufs, xs)
        return out, bufs

    ref_mod, mod = _pair(momentum, track, training, device)
    ref = _outcome(lambda: run(ref_mod))
    got = _outcome(lambda: run(mod))
    if momentum is None and track and training:
        # torch reads num_batches_tracked with .item() and cannot vmap this;
        # bnext computes the factor inside its op. Check against a loop.
        assert isinstance(ref, Exception) and "item" in str(ref)
        out, bufs = got
        for i in range(3):
            m = _pair(momentum, track, training, device)[1]
            torch.testing.assert_close(out[i], m(xs[i]))
            for k, v in m.named_buffers():
                torch.testing.assert_close(bufs[k][i], v)
        return
    _same_outcome(ref, got)


@pytest.mark.parametrize("momentum,track,training", CASES, ids=IDS)
def test_vmap_of_grad(momentum, track, training, device):
    """Per-sample-set gradients, buffers not passed: torch refuses when the
    running stats would be mutated under grad; so does bnext."""
    xs = torch.randn(3, 4, 3, 5, 5, device=device)

    def run(m):
        params = dict(m.named_parameters())
        f = grad(lambda p, x: functional_call(m, p, (x,)).square().sum())
        return vmap(f, in_dims=(None, 0))(params, xs)

    ref, got = (_outcome(lambda m=m: run(m)) for m in _pair(momentum, track, training, device))
    _same_outcome(ref, got)


def test_vmap_unbatched_running_stats_error(device):
    """Batched input into unbatched running buffers is refused, as in torch."""
    m = bnext.BatchNorm2d(3, device=device)
    before = m.running_mean.clone()
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        vmap(m)(torch.randn(2, 4, 3, 2, 2, device=device))
    torch.testing.assert_close(m.running_mean, before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jacrev_and_reverse_hessian(training, device):
    """Reverse mode to second order. Forward mode (jvp, jacfwd, hessian) is a
    documented limitation: bnext has no forward-mode formulas yet."""
    x = torch.randn(3, 2, 2, dtype=torch.float64, device=device)
    outs = []
    for cls in (torch.nn.BatchNorm1d, bnext.BatchNorm1d):
        torch.manual_seed(1)
        m = cls(2, track_running_stats=False, device=device, dtype=torch.float64).train(training)
        jac = torch.func.jacrev(m)(x)
        hess = torch.func.jacrev(torch.func.jacrev(lambda x: m(x).tanh().sum()))(x)
        outs.append((jac, hess))
    torch.testing.assert_close(outs[1], outs[0])


def test_forward_mode_is_refused_clearly(device):
    m = bnext.BatchNorm1d(2, track_running_stats=False, device=device)
    x = torch.randn(3, 2, device=device)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.func.jvp(m, (x,), (torch.ones_like(x),))
