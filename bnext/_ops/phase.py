"""Fake kernels of the phase ops (csrc/ops.cpp): batch norm split into the
passes distributed training composes. They have no autograd of their own:
``bnext.nn.sync`` composes them inside an autograd.Function whose backward
is the phase ops themselves."""

import torch

from .common import acc_dtype, empty_like_output, empty_stat


@torch.library.register_fake("bnext::batch_norm_moments")
def _batch_norm_moments_fake(input):
    return input.new_empty((3, input.shape[1]), dtype=torch.float64)


@torch.library.register_fake("bnext::batch_norm_merge_moments")
def _batch_norm_merge_moments_fake(moments, eps):
    C = moments.shape[2]
    return tuple(moments.new_empty((C,)) for _ in range(4))


@torch.library.register_fake("bnext::batch_norm_elemt")
def _batch_norm_elemt_fake(input, weight, bias, mean, invstd, residual, activation,
                           negative_slope):
    return empty_like_output(input)


@torch.library.register_fake("bnext::batch_norm_backward_reduce")
def _batch_norm_backward_reduce_fake(grad_output, input, mean, invstd, weight, bias,
                                     residual, activation, negative_slope, output_mask):
    param_dtype = weight.dtype if weight is not None else acc_dtype(input.dtype)
    return (
        input.new_empty((2, input.shape[1]), dtype=torch.float64),
        empty_stat(input, param_dtype) if output_mask[0] else None,
        empty_stat(input, param_dtype) if output_mask[1] else None,
        empty_like_output(input) if output_mask[2] else None,
    )


@torch.library.register_fake("bnext::batch_norm_backward_elemt")
def _batch_norm_backward_elemt_fake(grad_output, input, mean, invstd, weight, bias, residual,
                                    grad_residual, sums, count, activation, negative_slope):
    return empty_like_output(input)
