"""The modules read weight, bias and buffers from the module's tables
directly (bnext/nn/_members.py); where a parameter is not in its table
the normal attribute lookup must still run. These cases move it out:
a parametrization (the parameter becomes a property) and an instance
attribute that a forward pre-hook sets, as torch's weight_norm does."""

import pytest
import torch
import torch.nn.utils.parametrize as parametrize

import bnext


class _Softplus(torch.nn.Module):
    def forward(self, raw):
        return torch.nn.functional.softplus(raw)


def _pair(device):
    mods = []
    for cls in (torch.nn.BatchNorm2d, bnext.BatchNorm2d):
        torch.manual_seed(3)
        m = cls(4, device=device)
        with torch.no_grad():
            m.weight.uniform_(-1, 1)
            m.bias.uniform_(-1, 1)
        mods.append(m)
    return mods


def _check_steps(ref, got, params_of, device, steps=3):
    torch.manual_seed(4)
    for _ in range(steps):
        x = torch.randn(3, 4, 5, 6, device=device)
        dy = torch.randn_like(x)
        xr = x.clone().requires_grad_(True)
        xg = x.clone().requires_grad_(True)
        yr, yg = ref(xr), got(xg)
        torch.testing.assert_close(yg, yr)
        gr = torch.autograd.grad(yr, [xr, *params_of(ref)], dy)
        gg = torch.autograd.grad(yg, [xg, *params_of(got)], dy)
        for a, b in zip(gg, gr):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(got.running_mean, ref.running_mean)
    torch.testing.assert_close(got.running_var, ref.running_var)
    assert int(got.num_batches_tracked) == int(ref.num_batches_tracked) == steps


@pytest.mark.parametrize("tensor", ["weight", "bias"])
def test_parametrized_parameter(tensor, device):
    ref, got = _pair(device)
    for m in (ref, got):
        parametrize.register_parametrization(m, tensor, _Softplus())
        assert tensor not in m._parameters
    _check_steps(ref, got, lambda m: [getattr(m.parametrizations, tensor).original], device)


def test_weight_set_by_pre_hook(device):
    """A plain instance attribute named ``weight``, recomputed before every
    call from another parameter (the pattern of torch's weight_norm)."""
    ref, got = _pair(device)

    def hook(m, args):
        m.weight = m.weight_raw * 2.0

    for m in (ref, got):
        raw = m.weight.detach().clone()
        del m._parameters["weight"]
        m.weight_raw = torch.nn.Parameter(raw)
        m.register_forward_pre_hook(hook)
    _check_steps(ref, got, lambda m: [m.weight_raw, m.bias], device)
