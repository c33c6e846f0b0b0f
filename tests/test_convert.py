"""Drop-in compatibility: constructor, isinstance, state_dict both ways, and
convert_batchnorm / revert_batchnorm."""

import copy
import inspect

import pytest
import torch

import bnext

PAIRS = [(bnext.BatchNorm1d, torch.nn.BatchNorm1d), (bnext.BatchNorm2d, torch.nn.BatchNorm2d),
         (bnext.BatchNorm3d, torch.nn.BatchNorm3d)]


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_same_constructor_and_isinstance(ours, theirs):
    assert inspect.signature(ours) == inspect.signature(theirs)
    m = ours(4, eps=1e-3, momentum=None, affine=True, track_running_stats=True, bias=False,
             dtype=torch.float64)
    assert isinstance(m, theirs)
    assert m.bias is None and m.weight.dtype == torch.float64
    assert list(dict(m.named_parameters())) == list(dict(theirs(4, bias=False).named_parameters()))


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_state_dict_loads_both_ways(ours, theirs, affine, track):
    a = ours(5, affine=affine, track_running_stats=track)
    b = theirs(5, affine=affine, track_running_stats=track)
    assert list(a.state_dict()) == list(b.state_dict())
    with torch.no_grad():
        for t in b.state_dict().values():
            t.copy_(torch.rand_like(t.float()).to(t.dtype) if t.is_floating_point() else t + 7)
    a.load_state_dict(b.state_dict())
    b2 = theirs(5, affine=affine, track_running_stats=track)
    b2.load_state_dict(a.state_dict())
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v) and torch.equal(b2.state_dict()[k], v)


def _model():
    shared = torch.nn.BatchNorm2d(8)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), shared, torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), shared),
        torch.nn.Flatten(2), torch.nn.BatchNorm1d(8, momentum=None),
        torch.nn.Flatten(1), torch.nn.Linear(8 * 16, 6), torch.nn.BatchNorm1d(6, affine=False),
        torch.nn.Unflatten(1, (6, 1, 1, 1)), torch.nn.BatchNorm3d(6, track_running_stats=False),
    )


def test_convert_and_revert_keep_state():
    model = _model().double()
    with torch.no_grad():
        for b in model.modules():
            if isinstance(b, torch.nn.modules.batchnorm._BatchNorm) and b.affine:
                b.weight.uniform_(0.5, 1.5)
    model[5].eval()  # one layer in eval: the flag must survive
    reference = copy.deepcopy(model)
    hook_calls = []
    model[1].register_forward_hook(lambda *a: hook_calls.append(1))
    params_before = [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    converted = bnext.convert_batchnorm(model)
    kinds = [type(m) for m in converted.modules()]
    assert not any(k in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d) for k in kinds)
    assert converted[1] is converted[3][1], "a shared BN must stay shared"
    assert [id(p) for p in converted.parameters()] == params_before, "parameters must be the same objects"
    assert converted[5].training is False and converted[1].training is True
    assert all(p.dtype == torch.float64 for p in converted.parameters())

    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    for _ in range(2):
        y_ref, y = reference(x), converted(x)
        torch.testing.assert_close(y, y_ref)
        y.sum().backward()
        opt.step()  # the optimizer built before conversion still drives the model
        opt.zero_grad()
        y_ref.sum().backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    for a, b in zip(converted.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert len(hook_calls) == 2 * 2  # hook kept; shared module runs twice per forward

    reverted = bnext.revert_batchnorm(converted)
    assert type(reverted[1]) is torch.nn.BatchNorm2d and type(reverted[5]) is torch.nn.BatchNorm1d
    assert [id(p) for p in reverted.parameters()] == params_before
    torch.testing.assert_close(reverted(x), reference(x))


def test_convert_bare_module_and_leaves_subclasses():
    bn = torch.nn.BatchNorm2d(3)
    out = bnext.convert_batchnorm(bn)
    assert type(out) is bnext.BatchNorm2d and out.weight is bn.weight
    sync = torch.nn.SyncBatchNorm(3)
    assert bnext.convert_batchnorm(sync) is sync
