import pytest
import torch

import bnext  # noqa: F401  (registers the ops once for every test)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() and hasattr(torch.ops.bnext.batch_norm_train, "default")
                 and torch._C._dispatch_has_kernel_for_dispatch_key("bnext::batch_norm_train", "CUDA")),
            reason="needs a CUDA device and bnext built with CUDA kernels",
        ),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
