"""Frozen BN: equals torch's BN in eval, stays fixed in train(), passes the
input gradient, loads torch/torchvision state_dicts; freeze/unfreeze."""

import copy

import pytest
import torch

import bnext

CASES = [(torch.nn.BatchNorm1d, bnext.FrozenBatchNorm1d, (6, 4)),
         (torch.nn.BatchNorm1d, bnext.FrozenBatchNorm1d, (6, 4, 5)),
         (torch.nn.BatchNorm2d, bnext.FrozenBatchNorm2d, (3, 4, 5, 5)),
         (torch.nn.BatchNorm3d, bnext.FrozenBatchNorm3d, (2, 4, 3, 3, 2))]


def _trained_bn(cls, shape, device, affine=True):
    bn = cls(shape[1], affine=affine, device=device)
    for _ in range(3):
        bn(torch.randn(shape, device=device) * 2 + 1)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return bn.eval()


@pytest.mark.parametrize("torch_cls,frozen_cls,shape", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_frozen_equals_torch_eval_and_stays_fixed(torch_cls, frozen_cls, shape, affine, device):
    ref = _trained_bn(torch_cls, shape, device, affine)
    frozen = frozen_cls(shape[1], device=device)
    frozen.load_state_dict(ref.state_dict())
    frozen.train()  # frozen in train mode too
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    assert not list(frozen.parameters())
    for _ in range(2):
        x = torch.randn(shape, device=device, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        y, yr = frozen(x), ref(xr)
        torch.testing.assert_close(y, yr)
        g = torch.randn_like(y)
        y.backward(g)
        yr.backward(g)
        torch.testing.assert_close(x.grad, xr.grad)
    for k, v in frozen.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_loads_torchvision_style_state_dict(device):
    sd = {"weight": torch.rand(4) + 0.5, "bias": torch.randn(4),
          "running_mean": torch.randn(4), "running_var": torch.rand(4) + 0.5}
    m = bnext.FrozenBatchNorm2d(4, device=device)
    m.load_state_dict(sd)  # strict: no num_batches_tracked needed
    x = torch.randn(2, 4, 3, 3, device=device)
    ref = torch.nn.BatchNorm2d(4, device=device).eval()
    ref.load_state_dict(sd, strict=False)
    torch.testing.assert_close(m(x), ref(x))
    assert set(m.state_dict()) == set(sd)


def test_bad_input(device):
    m = bnext.FrozenBatchNorm2d(4, device=device)
    with pytest.raises(ValueError, match="4D"):
        m(torch.randn(2, 4, 3, device=device))
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 5, 3, 3, device=device))


def test_channels_last_and_half(device):
    ref = _trained_bn(torch.nn.BatchNorm2d, (3, 4, 5, 5), device)
    m = bnext.FrozenBatchNorm2d(4, device=device)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 5, 5, device=device).to(memory_format=torch.channels_last)
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref(x))
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(m(xb), ref(xb.float()).to(torch.bfloat16))


def _model(device):
    shared = torch.nn.BatchNorm2d(4)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), shared, torch.nn.ReLU(), shared,
        torch.nn.Sequential(bnext.BatchNorm2d(4), torch.nn.BatchNorm2d(4, track_running_stats=False)),
        torch.nn.Flatten(), torch.nn.LazyLinear(5), torch.nn.BatchNorm1d(5, affine=False),
    ).to(device)


def test_freeze_and_unfreeze_model(device):
    model = _model(device)
    x = torch.randn(4, 3, 6, 6, device=device)
    for _ in range(2):
        model(x)
    model.eval()
    expected = model(x)
    frozen = bnext.freeze_batchnorm(copy.deepcopy(model))
    assert isinstance(frozen[1], bnext.FrozenBatchNorm2d) and frozen[1] is frozen[3]
    assert isinstance(frozen[4][0], bnext.FrozenBatchNorm2d)
    assert type(frozen[4][1]) is torch.nn.BatchNorm2d  # no statistics to freeze
    assert isinstance(frozen[7], bnext.FrozenBatchNorm1d)
    torch.testing.assert_close(frozen(x), expected)
    frozen.train()
    frozen[4][1].eval()  # the unfrozen untracked BN uses batch stats either way
    torch.testing.assert_close(frozen(x), expected)

    unfrozen = bnext.unfreeze_batchnorm(frozen).eval()
    assert type(unfrozen[1]) is bnext.BatchNorm2d and unfrozen[1] is unfrozen[3]
    assert unfrozen[1].weight.requires_grad
    torch.testing.assert_close(unfrozen(x), expected)


def test_freeze_root_bn(device):
    bn = _trained_bn(torch.nn.BatchNorm2d, (2, 3, 2, 2), device)
    frozen = bnext.freeze_batchnorm(bn)
    assert isinstance(frozen, bnext.FrozenBatchNorm2d)
    x = torch.randn(2, 3, 2, 2, device=device)
    torch.testing.assert_close(frozen(x), bn(x))
