"""Bad input raises the exception type torch raises, and mutates nothing."""

import pytest
import torch
import torch.nn.functional as F

import bnext


def _raises_like_torch(ours, theirs):
    """Run both callables; both must raise, with the same exception type."""
    with pytest.raises(Exception) as torch_exc:
        theirs()
    with pytest.raises(type(torch_exc.value)) as our_exc:
        ours()
    assert type(our_exc.value) is type(torch_exc.value)
    return our_exc.value


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m, snap):
    for k, v in m.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed by a failed call"


MODULE_CASES = [
    # (module class, num_features, bad input, why)
    (bnext.BatchNorm2d, 3, lambda d: torch.randn(2, 3, 4, device=d), "3-D input to BatchNorm2d"),
    (bnext.BatchNorm1d, 3, lambda d: torch.randn(2, 3, 4, 4, device=d), "4-D input to BatchNorm1d"),
    (bnext.BatchNorm3d, 3, lambda d: torch.randn(2, 3, 4, 4, device=d), "4-D input to BatchNorm3d"),
    (bnext.BatchNorm1d, 3, lambda d: torch.randn(1, 3, device=d), "one value per channel"),
    (bnext.BatchNorm2d, 3, lambda d: torch.randn(1, 3, 1, 1, device=d), "one value per channel"),
    (bnext.BatchNorm2d, 3, lambda d: torch.randn(2, 4, 3, 3, device=d), "channel mismatch"),
    (bnext.BatchNorm2d, 3, lambda d: torch.ones(2, 3, 3, 3, dtype=torch.long, device=d), "integer dtype"),
    (bnext.BatchNorm2d, 3, lambda d: torch.randn(2, 3, 3, 3, device=d, dtype=torch.float64), "dtype mismatch"),
]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls,C,make,why", MODULE_CASES, ids=[c[3] for c in MODULE_CASES])
def test_module_bad_input(cls, C, make, why, momentum, device):
    ours = cls(C, momentum=momentum, device=device)
    # torch's module increments num_batches_tracked before it raises; ours must not.
    theirs = bnext.revert_batchnorm(cls(C, momentum=momentum, device=device))
    x = make(device)
    snap = _snapshot(ours)
    _raises_like_torch(lambda: ours(x), lambda: theirs(x))
    _unchanged(ours, snap)


def _fargs(device, C=3, **over):
    a = dict(input=torch.randn(4, C, 5, device=device), running_mean=torch.zeros(C, device=device),
             running_var=torch.ones(C, device=device), weight=torch.ones(C, device=device),
             bias=torch.zeros(C, device=device), training=True, momentum=0.1, eps=1e-5)
    a.update(over)
    return a


FUNCTIONAL_CASES = {
    "weight size": dict(weight="wrong_size"),
    "bias size": dict(bias="wrong_size"),
    "running_var size": dict(running_var="wrong_size"),
    "only running_mean": dict(running_var=None),
    "eval without stats": dict(running_mean=None, running_var=None, training=False),
    "zero eps in training": dict(eps=0.0),
    "negative eps in eval": dict(eps=-1.0, training=False),
    "weight on meta": dict(weight="meta"),
    "float64 weight, float32 input": dict(weight="float64"),
    "bfloat16 weight, float32 input": dict(weight="bfloat16"),
    "integer input": dict(input="long"),
}


def _materialise(spec, device):
    a = _fargs(device)
    for k, v in spec.items():
        if v == "wrong_size":
            a[k] = torch.ones(4, device=device)
        elif v == "meta":
            a[k] = torch.ones(3, device="meta")
        elif v in ("float64", "bfloat16"):
            a[k] = a[k].to(getattr(torch, v))
        elif v == "long":
            a[k] = a[k].long()
        else:
            a[k] = v
    return a


@pytest.mark.parametrize("name", list(FUNCTIONAL_CASES))
def test_functional_bad_input(name, device):
    a = _materialise(FUNCTIONAL_CASES[name], device)
    stats = [t.clone() for t in (a["running_mean"], a["running_var"]) if t is not None]
    err = _raises_like_torch(lambda: bnext.functional.batch_norm(**a),
                             lambda: F.batch_norm(**_materialise(FUNCTIONAL_CASES[name], device)))
    assert str(err), "error without a message"
    for before, t in zip(stats, [t for t in (a["running_mean"], a["running_var"]) if t is not None]):
        assert torch.equal(before, t)


def test_ops_validate_on_their_own(device):
    """Direct op calls get the same checks (RuntimeError from C++)."""
    x = torch.randn(4, 3, 5, device=device)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
        torch.ops.bnext.batch_norm_train(x, torch.ones(4, device=device), None, 1e-5)
    with pytest.raises(ValueError, match="eps must be positive"):
        torch.ops.bnext.batch_norm_train(x, None, None, 0.0)
    with pytest.raises(NotImplementedError):
        torch.ops.bnext.batch_norm_train(x.long(), None, None, 1e-5)
    rm = torch.zeros(3, device=device)
    with pytest.raises(RuntimeError, match="running_var should contain"):
        torch.ops.bnext.update_running_stats(rm, torch.ones(2, device=device), rm, rm, 0.1, None)
    assert torch.equal(rm, torch.zeros(3, device=device))
