"""bnext's forward and backward dispatch only bnext ops for the normalization:
never aten's batch_norm, var or mean."""

import pytest
import torch

import bnext
from helpers import DTYPES, FORBIDDEN, RecordOps, aten_base, dtype_id

@pytest.mark.parametrize("dtypes", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_no_torch_batch_norm_ops(dtypes, training, momentum, device):
    in_dtype, p_dtype = dtypes
    m = bnext.BatchNorm2d(5, momentum=momentum, device=device, dtype=p_dtype).train(training)
    x = torch.randn(4, 5, 3, 3, device=device, dtype=in_dtype, requires_grad=True)
    with RecordOps() as rec:
        y = m(x)
        y.backward(torch.randn_like(y))
    bnext_ops = [n for n in rec.names if n.startswith("bnext::")]
    assert any("batch_norm_train" in n or "batch_norm_eval" in n for n in bnext_ops)
    assert any("batch_norm_backward" in n for n in bnext_ops)
    offenders = [n for n in rec.names if n.startswith("aten::")
                 and any(f in aten_base(n) for f in FORBIDDEN)]
    assert not offenders, f"torch normalization ops dispatched: {offenders}"


def test_recorder_catches_torch_batch_norm():
    """The recorder is not blind: torch's own module does show up."""
    m = torch.nn.BatchNorm2d(3)
    with RecordOps() as rec:
        m(torch.randn(2, 3, 2, 2))
    assert any("batch_norm" in aten_base(n) for n in rec.names)
