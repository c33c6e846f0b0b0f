"""The fused ops themselves: opcheck, what backward keeps, own kernels only,
and bad input rejected before anything changes."""

import pytest
import torch

import bnext
from helpers import FORBIDDEN, RecordOps, aten_base
from references import ACT_CASE_IDS, ACT_CASES

ops = bnext.ops


def _args(layout, dtype=torch.float32, pdtype=None, requires_grad=True, residual=True):
    pdtype = pdtype or dtype
    x = torch.randn(3, 4, 5, 6, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x) if residual else None
    w = torch.rand(4, dtype=pdtype) + 0.5
    b = torch.randn(4, dtype=pdtype)
    for t in (x, r, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, r, w, b


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation,memory_saving", ACT_CASES, ids=ACT_CASE_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.bfloat16, torch.float32)],
                         ids=["f32", "bf16-f32params"])
def test_opcheck(layout, activation, memory_saving, residual, dtypes):
    x, r, w, b = _args(layout, *dtypes, residual=residual)
    rm, rv = torch.zeros(4, dtype=w.dtype), torch.ones(4, dtype=w.dtype)
    torch.library.opcheck(ops.batch_norm_act_train.default,
                          (x, w, b, r, 1e-5, activation, 0.1, memory_saving))
    torch.library.opcheck(ops.batch_norm_act_eval.default,
                          (x, rm, rv, w, b, r, 1e-5, activation, 0.1, memory_saving))
    y, mean, invstd, _ = ops.batch_norm_act_train(x, w, b, r, 1e-5, activation, 0.1, memory_saving)
    saved = (y if memory_saving else x).detach()
    dy = torch.randn_like(saved)
    for train in (True, False):
        torch.library.opcheck(
            ops.batch_norm_act_backward.default,
            (dy, saved, memory_saving, w.detach(), b.detach(), None if r is None else r.detach(),
             rm, rv, mean, invstd, train, 1e-5, activation, 0.1, [True, residual, True, True]))


def _saved_storages(fn):
    """data_ptrs of the storages autograd keeps while fn's graph is alive."""
    ptrs = set()

    def pack(t):
        ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return ptrs, out


@pytest.mark.parametrize("memory_saving", [False, True])
def test_backward_keeps_input_or_output_not_both(memory_saving):
    m = bnext.BatchNormAct2d(4, activation="leaky_relu", memory_saving=memory_saving)
    x, r, _, _ = _args("contiguous")
    ptrs, y = _saved_storages(lambda: m(x, r))
    big = {t.untyped_storage().data_ptr(): name for name, t in (("input", x), ("residual", r), ("output", y))}
    kept = sorted(big[p] for p in ptrs if p in big)
    assert kept == (["output", "residual"] if memory_saving else ["input", "residual"])


def test_torch_bn_relu_keeps_input_and_output():
    """The baseline the fused path improves on (so the check above is not vacuous)."""
    bn = torch.nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 6, requires_grad=True)
    holder = {}

    def run():
        holder["z"] = bn(x)
        return torch.nn.functional.leaky_relu(holder["z"])

    ptrs, _ = _saved_storages(run)
    assert x.untyped_storage().data_ptr() in ptrs
    assert holder["z"].untyped_storage().data_ptr() in ptrs


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_saving", [False, True])
def test_no_torch_batch_norm_ops(training, memory_saving):
    m = bnext.BatchNormAct2d(4, activation="elu", memory_saving=memory_saving).train(training)
    x, r, _, _ = _args("channels_last")
    with RecordOps() as rec:
        y = m(x, r)
        y.backward(torch.randn_like(y))
    assert any("batch_norm_act_" in n for n in rec.names)
    assert any("batch_norm_act_backward" in n for n in rec.names)
    offenders = [n for n in rec.names if n.startswith("aten::")
                 and any(f in aten_base(n) for f in FORBIDDEN)]
    assert not offenders, offenders


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m, before):
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "gelu_tanh"])
def test_memory_saving_needs_invertible_activation(activation):
    with pytest.raises(ValueError, match="invertible"):
        bnext.BatchNormAct2d(4, activation=activation, memory_saving=True)
    x, r, w, b = _args("contiguous", requires_grad=False)
    with pytest.raises(ValueError, match="invertible"):
        bnext.functional.batch_norm_act(x, None, None, w, b, True, activation=activation,
                                        memory_saving=True)


def test_memory_saving_leaky_relu_needs_positive_slope():
    with pytest.raises(ValueError, match="negative_slope > 0"):
        bnext.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.0, memory_saving=True)
    bnext.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.0)  # fine without


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        bnext.BatchNormAct2d(4, activation="tanh")
    x, r, w, b = _args("contiguous", requires_grad=False)
    with pytest.raises(ValueError, match="unknown activation"):
        ops.batch_norm_act_train(x, w, b, r, 1e-5, "tanh", 0.0, False)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_weight_with_memory_saving_rejected_before_mutation(training):
    m = bnext.BatchNormAct2d(4, activation="leaky_relu", memory_saving=True).train(training)
    m(torch.randn(3, 4, 5, 6))  # some history in the buffers
    with torch.no_grad():
        m.weight[2] = 0.0
    before = _state(m)
    with pytest.raises(ValueError, match="weight is 0"):
        m(torch.randn(3, 4, 5, 6))
    _assert_unchanged(m, before)
    m.memory_saving = False  # the same layer without memory_saving is fine
    m(torch.randn(3, 4, 5, 6))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda x: torch.randn(3, 4, 5, 7), RuntimeError, "residual has size"),
    (lambda x: x.double(), RuntimeError, "residual dtype"),
])
def test_bad_residual_rejected_before_mutation(bad, exc, match):
    m = bnext.BatchNormAct2d(4)
    x = torch.randn(3, 4, 5, 6)
    before = _state(m)
    with pytest.raises(exc, match=match):
        m(x, bad(x))
    _assert_unchanged(m, before)
    with pytest.raises(exc, match=match):  # the op checks too, for direct callers
        ops.batch_norm_act_train(x, None, None, bad(x), 1e-5, "relu", 0.0, False)


def test_bn_errors_rejected_before_mutation():
    m = bnext.BatchNormAct2d(4)
    before = _state(m)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 4, 1, 1))
    with pytest.raises(RuntimeError, match="should contain 3 elements not 4"):
        bnext.functional.batch_norm_act(torch.randn(2, 3, 2, 2), m.running_mean, m.running_var,
                                        training=True)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 4, 3))
    _assert_unchanged(m, before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export(training):
    m = bnext.BatchNormAct2d(4, activation="gelu").train(training)
    twin = bnext.BatchNormAct2d(4, activation="gelu").train(training)
    x, r, _, _ = _args("contiguous", requires_grad=False)
    ep = torch.export.export(twin, (x, r))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert ("bnext.batch_norm_act_train_step.default" if training else
            "bnext.batch_norm_act_eval.default") in targets
    exported = ep.module()
    for _ in range(2):
        torch.testing.assert_close(exported(x, r), m(x, r))
    if training:  # buffer updates are part of the exported graph
        for name, buf in m.named_buffers():
            torch.testing.assert_close(exported.get_buffer(name), buf)
