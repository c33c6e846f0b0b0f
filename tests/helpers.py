"""Shared helpers: reference comparisons against torch."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# (input dtype, parameter dtype): all-in-one-dtype and the mixed-precision case.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


def dtype_id(pair):
    i, p = pair
    short = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
    return short[i] if i == p else f"{short[i]}-{short[p]}params"


def reference_dtype(dtype):
    """dtype in which torch computes the reference for inputs of `dtype`.

    For float16/bfloat16 the reference is torch evaluated on the same values
    upcast to float32, then rounded to the low dtype. torch's all-bfloat16 CPU
    path rounds its intermediate statistics to bfloat16 and is about twice as
    far from the exact result as bnext (which keeps statistics in float32), so
    comparing against it directly would test torch's rounding, not semantics.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def assert_close(actual, expected, **kw):
    """torch.testing.assert_close at the default tolerances of `actual`'s dtype,
    after rounding `expected` (a reference, possibly computed in higher
    precision) to that dtype."""
    if isinstance(expected, torch.Tensor) and expected.dtype != actual.dtype:
        expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, **kw)


def make_input(shape, layout, dtype, device):
    """A tensor of `shape` in the requested memory layout.

    layout: "contiguous", "channels_last" (4-D/5-D only), or "strided", a
    non-contiguous view (every other element of a wider last dimension).
    """
    if layout == "contiguous":
        return torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    if layout == "strided":
        wide = list(shape[:-1]) + [shape[-1] * 2]
        return torch.randn(wide, device=device).to(dtype)[..., ::2]
    raise ValueError(layout)


# aten ops whose presence would mean bnext fell back on torch's normalization.
FORBIDDEN = ("batch_norm", "var", "mean", "std")


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def aten_base(name):
    # "aten::native_batch_norm.out" -> "native_batch_norm"
    return name.split("::")[-1].split(".")[0]
