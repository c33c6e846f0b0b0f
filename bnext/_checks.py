"""Argument validation done in Python before any op runs.

A training step is several ops (increment ``num_batches_tracked``, compute,
update running stats). Checking everything first means a rejected call leaves
every buffer untouched. Error types and messages follow torch's batch norm;
the C++ ops repeat the per-op checks for direct callers.
"""

import torch

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_REDUCED = (torch.float16, torch.bfloat16)


def check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps):
    """Raise ValueError / RuntimeError / NotImplementedError as torch does."""
    if input.dim() < 2:
        raise ValueError(
            f"bnext batch_norm: expected input of shape (N, C, *) with at least "
            f"2 dimensions, got {input.dim()}D input"
        )
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(
            f"bnext batch_norm: input must be float32, float64, bfloat16 or "
            f"float16, got {input.dtype}"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must either both be None or neither be None"
        )
    if training:
        size = input.shape
        size_prods = size[0]
        for s in size[2:]:
            size_prods *= s
        if size_prods == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {size}"
            )
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    else:
        if eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        if running_mean is None:
            raise RuntimeError("running_mean must be defined in evaluation mode")

    channels = input.shape[1]
    device = input.device
    param_dtype = None
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is None:
            continue
        if t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
        if t.device != device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found input on "
                f"{device} and {name} on {t.device}"
            )
        if param_dtype is None:
            param_dtype = t.dtype
            if not (param_dtype == input.dtype
                    or (param_dtype == torch.float32 and input.dtype in _REDUCED)):
                raise RuntimeError(
                    f"bnext batch_norm: {name} has dtype {t.dtype} but input has dtype "
                    f"{input.dtype}; parameters and running stats must have the input's "
                    "dtype, or float32 when the input is float16/bfloat16"
                )
        elif t.dtype != param_dtype:
            raise RuntimeError(
                f"bnext batch_norm: {name} has dtype {t.dtype} but other parameters have "
                f"dtype {param_dtype}; all parameters and running stats must share a dtype"
            )
