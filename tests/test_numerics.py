"""Numerical edge cases: stable variance, constant channels, NaN isolation,
empty batches, large tensors on every parallel path, thread-count
independence, bfloat16 rounding."""

import pytest
import torch
import torch.nn.functional as F

import bnext
from helpers import assert_close

LAYOUTS = [((32, 4, 20, 20), torch.contiguous_format), ((32, 4, 20, 20), torch.channels_last),
           ((5000, 4), torch.contiguous_format)]


@pytest.mark.parametrize("shape,fmt", LAYOUTS, ids=str)
def test_variance_stable_when_mean_dwarfs_std(shape, fmt, device):
    """mean ~ 1e4 * std: E[x^2] - E[x]^2 in float32 would return garbage
    (even negative variances). The reference is torch in float64 on the
    same float32 values."""
    x = (torch.randn(shape, device=device) + 1e4).contiguous(memory_format=fmt)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    y = bnext.functional.batch_norm(x, rm, rv, training=True, momentum=1.0)

    x64 = x.double()
    rm64 = torch.zeros(4, device=device, dtype=torch.float64)
    rv64 = torch.ones(4, device=device, dtype=torch.float64)
    y64 = F.batch_norm(x64, rm64, rv64, training=True, momentum=1.0)
    assert_close(rv, rv64)  # float32 default tolerance on the unbiased variance
    assert_close(rm, rm64)
    # The batch mean itself is stored in float32, so no float32 result can be
    # closer than half an ulp of the mean, scaled by invstd (~1): bound by one ulp.
    ulp = torch.finfo(torch.float32).eps * 2 ** torch.log2(torch.tensor(1e4)).floor().item()
    assert (y.double() - y64).abs().max().item() <= ulp
    # ... and no worse than torch's own float32 result.
    yt = F.batch_norm(x, None, None, training=True)
    assert (y.double() - y64).abs().max() <= (yt.double() - y64).abs().max() + 1e-6


# (64, 32, 7, 7) and (100, 48, 14, 14): the channel-block walk of small planes.
@pytest.mark.parametrize("shape,fmt", LAYOUTS + [((64, 4, 7, 7), torch.contiguous_format),
                                                 ((64, 32, 7, 7), torch.contiguous_format),
                                                 ((100, 48, 14, 14), torch.contiguous_format)],
                         ids=str)
def test_variance_stable_when_first_chunk_is_an_outlier(shape, fmt, device):
    """The CPU statistics sum about a centre taken from each thread's first
    chunk of a channel. Sample 0 (the first chunk) sits 300 std above the
    rest, on top of a mean of 1e4 std: the variance must still be the
    float64 result at float32 tolerance."""
    x = torch.randn(shape, device=device) + 1e4
    x[0] += 300.0
    x = x.contiguous(memory_format=fmt)
    C = shape[1]
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    y = bnext.functional.batch_norm(x, rm, rv, training=True, momentum=1.0)
    rm64 = torch.zeros(C, device=device, dtype=torch.float64)
    rv64 = torch.ones(C, device=device, dtype=torch.float64)
    y64 = F.batch_norm(x.double(), rm64, rv64, training=True, momentum=1.0)
    assert_close(rv, rv64)
    assert_close(rm, rm64)
    assert_close(y, y64.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_constant_channel_normalizes_to_bias(fmt, device):
    x = torch.randn(4, 3, 5, 5, device=device)
    x[:, 1] = 7.25
    x = x.contiguous(memory_format=fmt)
    m = bnext.BatchNorm2d(3, device=device)
    with torch.no_grad():
        m.bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
    y = m(x)
    assert torch.all(y[:, 1] == 0.5)
    assert m.running_var[1].item() == pytest.approx(0.9)  # (1 - 0.1) * 1 + 0.1 * 0


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("training", [True, False])
def test_nan_stays_in_its_channel(fmt, training, device):
    x = torch.randn(4, 3, 5, 5, device=device)
    x[2, 1, 3, 3] = float("nan")
    x = x.contiguous(memory_format=fmt).requires_grad_(True)
    m = bnext.BatchNorm2d(3, device=device).train(training)
    y = m(x)
    y.backward(torch.ones_like(y))
    bad = y.isnan().flatten(2).any(-1).any(0)
    if training:
        assert bad.tolist() == [False, True, False]
        assert m.running_mean.isnan().tolist() == [False, True, False]
        assert x.grad.isnan().flatten(2).any(-1).any(0).tolist() == [False, True, False]
    else:
        assert int(y.isnan().sum()) == 1
    assert not m.weight.grad[[0, 2]].isnan().any()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (2, 3, 0)], ids=str)
def test_empty_batch_like_torch(shape, momentum, device):
    cls = {2: bnext.BatchNorm1d, 3: bnext.BatchNorm1d, 4: bnext.BatchNorm2d}[len(shape)]
    ours = cls(3, momentum=momentum, device=device)
    theirs = bnext.revert_batchnorm(cls(3, momentum=momentum, device=device))
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
            m.running_mean.fill_(0.5)
    xo = torch.randn(shape, device=device, requires_grad=True)
    xt = xo.detach().clone().requires_grad_(True)
    yo, yt = ours(xo), theirs(xt)
    assert yo.shape == yt.shape
    yo.sum().backward()
    yt.sum().backward()
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert_close(a, b)
    assert_close(ours.weight.grad, theirs.weight.grad)
    assert_close(ours.bias.grad, theirs.bias.grad)
    assert xo.grad.shape == xt.grad.shape


# Sizes that cross the chunk (4096 elements) and grain (32768) boundaries, so
# every thread and every chunk-merge path runs; 64 channels_last channels take
# the register row walk of the backward sums (38400 elements per channel);
# (300, 64, 7, 7) the channel-block walk of the statistics (7 flushes).
LARGE = [((6, 5, 70, 90), "contiguous"), ((6, 5, 70, 90), "channels_last"),
         ((9000, 7), "contiguous"), ((3, 300, 9, 11), "channels_last"), ((40, 3, 5000), "contiguous"),
         ((8, 64, 60, 80), "channels_last"), ((300, 64, 7, 7), "contiguous")]


@pytest.mark.parametrize("shape,layout", LARGE, ids=str)
def test_large_tensors_match_torch(shape, layout, device):
    """Reductions over ~1e5 elements per channel. The reference is torch's
    module run in float64 on the same values: torch's own float32 CPU
    gradients drift from it by up to ~17x the float32 tolerance here
    (channels_last weight grads), bnext's stay within it."""
    x = torch.randn(shape, device=device) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    cls = bnext.BatchNorm2d if x.dim() == 4 else bnext.BatchNorm1d
    ours = cls(shape[1], device=device)
    theirs = bnext.revert_batchnorm(cls(shape[1], device=device)).double()
    xo, xt = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    yo, yt = ours(xo), theirs(xt)
    assert_close(yo, yt)
    dy = torch.randn_like(x)
    yo.backward(dy)
    yt.backward(dy.double())
    assert_close(xo.grad, xt.grad)
    assert_close(ours.weight.grad, theirs.weight.grad)
    assert_close(ours.bias.grad, theirs.bias.grad)
    assert_close(ours.running_mean, theirs.running_mean)
    assert_close(ours.running_var, theirs.running_var)


def test_thread_count_does_not_change_results():
    x = torch.randn(8, 16, 40, 40)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, before)):
            torch.set_num_threads(n)
            rm, rv = torch.zeros(16), torch.ones(16)
            y = bnext.functional.batch_norm(x, rm, rv, training=True)
            outs.append((y, rm, rv))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert_close(a, b)


@pytest.mark.parametrize("shape,fmt", [((4, 6, 7, 7), torch.contiguous_format),
                                       ((4, 6, 7, 7), torch.channels_last),
                                       ((64, 6), torch.contiguous_format)], ids=str)
def test_bfloat16_output_rounds_like_torch(shape, fmt, device):
    # A bfloat16 output is the float32 result rounded to nearest even, as
    # torch's .to(torch.bfloat16) rounds it, including results that are
    # float32 subnormals (weight 1e-38), infinite ones (weight 3e38) and
    # NaN. The float32 eval on the same (bfloat16-exact) input gives the
    # unrounded result: both run the same float arithmetic.
    x = torch.randn(shape, device=device).to(torch.bfloat16)
    x[1, 4] = float("nan")
    x = x.contiguous(memory_format=fmt)
    weight = torch.tensor([1.0, 1e-38, 3e38, -2.5, 1e-37, 0.75], device=device)
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0, -1e-38, 0.0], device=device)
    running_mean = torch.randn(6, device=device)
    running_var = torch.rand(6, device=device) + 0.5
    running_mean[2], running_var[2] = 0.0, 1.0  # a finite scale: inf only in y
    args = (running_mean, running_var, weight, bias, False, 0.1, 1e-5)
    y = bnext.functional.batch_norm(x, *args)
    expected = bnext.functional.batch_norm(x.float(), *args).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    subnormal = expected.float().abs() < torch.finfo(torch.float32).tiny
    assert (subnormal & (expected != 0)).any() and expected.isinf().any()
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    # And against torch's own eval of the same values.
    assert_close(y, F.batch_norm(x.float(), *args), equal_nan=True)


@pytest.mark.parametrize("channels", [2048, 2049])
def test_eval_coefficients_beyond_stack_room(channels, device):
    # Eval coefficients of up to 2048 channels live on the op's stack
    # (EvalScratch), more on the heap: both must give torch's result.
    x = torch.randn(3, channels, 5, device=device)
    running_mean = torch.randn(channels, device=device)
    running_var = torch.rand(channels, device=device) + 0.1
    weight = torch.randn(channels, device=device)
    bias = torch.randn(channels, device=device)
    args = (running_mean, running_var, weight, bias, False, 0.1, 1e-5)
    assert_close(bnext.functional.batch_norm(x, *args), F.batch_norm(x, *args))
