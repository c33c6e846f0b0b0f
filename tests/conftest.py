import pytest
import torch

import bnext  # noqa: F401  (registers the ops once for every test)

HAS_BNEXT_CUDA = (
    torch.cuda.is_available()
    and torch._C._dispatch_has_kernel_for_dispatch_key("bnext::batch_norm_train", "CUDA")
)
requires_bnext_cuda = pytest.mark.skipif(
    not HAS_BNEXT_CUDA, reason="needs a CUDA device and bnext built with CUDA kernels"
)

DEVICES = ["cpu", pytest.param("cuda", marks=requires_bnext_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
