"""Where bnext follows torch on inputs a user or PyTorch's own OpInfo samples
reach: inputs without elements (1-D ``(0,)`` included), running statistics
that require grad, and the one-op training step (opcheck of the mutating
ops)."""

import pytest
import torch
import torch.nn.functional as F

import bnext
from bnext import ops

# (input shape, training, with weight and bias): every way to have no element.
EMPTY_CASES = [(shape, training, affine)
               for shape in [(0,), (0, 3), (2, 0), (0, 3, 4), (2, 0, 4, 4), (2, 3, 0), (0, 3, 2, 2)]
               for training in (True, False) for affine in (True, False)]


def _outcome(fn, x, training, affine):
    C = x.shape[1] if x.dim() > 1 else 0
    rm, rv = torch.zeros(C), torch.ones(C)
    w = torch.ones(C, requires_grad=True) if affine else None
    b = torch.zeros(C, requires_grad=True) if affine else None
    try:
        y = fn(x, rm, rv, w, b, training, 0.1, 1e-5)
    except Exception as e:  # noqa: BLE001  (the type is what is compared)
        return type(e), None
    y.sum().backward() if y.requires_grad else None
    grads = [t.grad for t in (x, w, b) if t is not None and t.requires_grad]
    return None, (y.shape, y.dtype, rm, rv, grads)


@pytest.mark.parametrize("shape,training,affine", EMPTY_CASES, ids=str)
def test_input_without_elements_matches_torch(shape, training, affine):
    theirs = _outcome(F.batch_norm, torch.randn(shape, requires_grad=True), training, affine)
    ours = _outcome(bnext.functional.batch_norm, torch.randn(shape, requires_grad=True),
                    training, affine)
    assert ours[0] is theirs[0]
    if theirs[0] is None:
        (s0, d0, rm0, rv0, g0), (s1, d1, rm1, rv1, g1) = theirs[1], ours[1]
        assert (s1, d1) == (s0, d0)
        torch.testing.assert_close(rm1, rm0)
        torch.testing.assert_close(rv1, rv0)
        assert len(g1) == len(g0)
        for a, e in zip(g1, g0):
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("eps,training", [(0.0, True), (-1.0, False)])
def test_input_without_elements_still_checks_eps(eps, training):
    x = torch.randn(0, 3)
    with pytest.raises(ValueError, match="eps"):
        F.batch_norm(x, torch.zeros(3), torch.ones(3), training=training, eps=eps)
    with pytest.raises(ValueError, match="eps"):
        bnext.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=training, eps=eps)


def test_module_counts_an_empty_batch_like_torch():
    ours, theirs = bnext.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for m in (ours, theirs):
        m(torch.randn(0, 3, 2, 2))
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 1
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_running_stats_requiring_grad_raise_like_torch(which, training):
    x = torch.randn(4, 3)

    def call(fn):
        stats = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
        stats[which].requires_grad_()
        return fn(x, stats["running_mean"], stats["running_var"], training=training)

    with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{which}'"):
        call(F.batch_norm)
    with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{which}'"):
        call(bnext.functional.batch_norm)
    with torch.no_grad():  # torch accepts them where nothing is recorded
        torch.testing.assert_close(call(bnext.functional.batch_norm), call(F.batch_norm))


def test_fused_training_refuses_running_stats_requiring_grad():
    rm = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument"):
        bnext.functional.batch_norm_act(torch.randn(4, 3), rm, torch.ones(3), training=True)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_opcheck_train_step(momentum, device):
    C = 3
    x = torch.randn(4, C, 5, device=device, requires_grad=True)
    w = torch.rand(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)

    def buffers():
        return (torch.zeros(C, device=device), torch.ones(C, device=device),
                torch.tensor(2, device=device))

    torch.library.opcheck(ops.batch_norm_train_step.default,
                          (x, w, b, *buffers(), momentum, 1e-5))
    torch.library.opcheck(ops.batch_norm_train_step.default,
                          (x, None, None, None, None, None, momentum, 1e-5))
    r = torch.randn(4, C, 5, device=device, requires_grad=True)
    torch.library.opcheck(ops.batch_norm_act_train_step.default,
                          (x, w, b, r, *buffers(), momentum, 1e-5, "silu", 0.01, False))
    torch.library.opcheck(ops.check_batch_norm_call.default,
                          (x, w, b, *buffers(), True, 1e-5))
