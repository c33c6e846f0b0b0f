"""Under torch.autocast bnext batch norm behaves as torch's: it is not cast by
autocast, so a low-precision conv output stays low precision, statistics are
float32, running buffers stay float32, and parameter grads are float32."""

import copy

import pytest
import torch

import bnext

AUTOCAST = {"cpu": [torch.bfloat16], "cuda": [torch.float16, torch.bfloat16]}


def _models(device):
    torch.manual_seed(2)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).to(device)
    return ref, bnext.convert_batchnorm(copy.deepcopy(ref))


@pytest.mark.parametrize("dtype_index", [0, 1], ids=["first", "second"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "cl"])
def test_autocast_matches_torch(dtype_index, training, channels_last, device):
    if dtype_index >= len(AUTOCAST[device]):
        pytest.skip("one autocast dtype on this device")
    dtype = AUTOCAST[device][dtype_index]
    ref, ours = _models(device)
    if channels_last:
        ref, ours = (m.to(memory_format=torch.channels_last) for m in (ref, ours))
    ref.train(training)
    ours.train(training)
    for step in range(2):
        x = torch.randn(4, 3, 6, 6, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outs, bn_outs = [], []
        for m in (ref, ours):
            hook = m[1].register_forward_hook(lambda mod, i, o: bn_outs.append(o))
            with torch.autocast(device, dtype=dtype):
                y = m(x)
            hook.remove()
            y.float().square().sum().backward()
            outs.append(y)
        assert bn_outs[1].dtype == bn_outs[0].dtype == dtype
        assert bn_outs[1].is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(bn_outs[1], bn_outs[0])
        assert outs[1].dtype == outs[0].dtype
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        assert p.grad.dtype == p_ref.grad.dtype == torch.float32
    bn_ref, bn = ref[1], ours[1]
    for buf in ("running_mean", "running_var"):
        b, b_ref = getattr(bn, buf), getattr(bn_ref, buf)
        assert b.dtype == b_ref.dtype == torch.float32
        torch.testing.assert_close(b, b_ref)
    torch.testing.assert_close(bn.weight.grad, bn_ref.weight.grad)
    torch.testing.assert_close(bn.bias.grad, bn_ref.bias.grad)
