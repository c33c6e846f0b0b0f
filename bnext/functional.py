"""Functional batch normalization on bnext's kernels.

``batch_norm`` has exactly the signature and semantics of
``torch.nn.functional.batch_norm``.
"""

from typing import Optional

import torch
from torch import Tensor

from ._ops import ops
from ._ops.batch_norm import eval_forward, train_forward

__all__ = ["batch_norm", "batch_norm_act"]


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch normalization over the channel dimension of an ``(N, C, *)`` input.

    Same contract as :func:`torch.nn.functional.batch_norm` (Ioffe & Szegedy,
    2015, "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift"), computed by bnext's kernels.

    With ``training=True`` each channel is normalized by its batch mean and
    biased variance, :math:`y = \gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon}
    + \beta`, and, when given, ``running_mean``/``running_var`` are updated in
    place: ``running = (1 - momentum) * running + momentum * batch``, using the
    *unbiased* batch variance. With ``training=False`` the running statistics
    normalize and nothing is updated.

    Args:
        input: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or
            ``(N, C, D, H, W)``; float32, float64, float16 or bfloat16; any
            strides (contiguous and channels_last are processed natively). The
            output has the input's dtype and torch's output memory format
            (channels_last stays channels_last).
        running_mean, running_var: ``(C,)`` or None (then batch statistics are
            used and nothing is tracked). Must both be None or both be given.
        weight, bias: ``(C,)`` affine parameters, or None.
            All per-channel tensors share one dtype: the input's, or float32
            when the input is float16/bfloat16 (mixed precision).
        training: use batch statistics and update the running ones.
        momentum: weight of the new batch in the running average.
        eps: added to the variance for numerical stability; > 0 in training.

    Returns:
        Tensor of the input's shape and dtype.

    Raises:
        ValueError: input with fewer than 2 dims; a training batch with one
            value per channel; a bad ``eps``; only one of the running stats.
        RuntimeError: a per-channel tensor whose size is not C, on another
            device, or of an unsupported dtype; eval without running stats;
            running stats that require grad while autograd records the call.
        NotImplementedError: a non-floating input dtype.
        IndexError: an input without elements with a weight or bias without
            elements (torch's rule for such inputs: only ``eps`` is checked,
            the output is empty and no statistic changes).

    Statistics are accumulated in float32 (float64 for float64 input) with a
    shifted, chunked Welford/Chan scheme. Errors are raised before any buffer
    is modified.
    """
    return _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, None
    )


def _batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor],
) -> Tensor:
    """Shared by the functional API and the modules.

    One op per call: ``batch_norm_train_step`` validates every argument, then
    computes, then increments ``num_batches_tracked`` (when given) and updates
    the running statistics, so a rejected call changes nothing.
    ``momentum=None`` means a cumulative average with factor
    ``1 / num_batches_tracked``, read on the device (torch.compile-friendly).
    """
    if torch._C._are_functorch_transforms_active():
        return _composed_batch_norm(input, running_mean, running_var, weight, bias, training,
                                    momentum, eps, num_batches_tracked)
    if not training:
        return ops.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
    return ops.batch_norm_train_step(input, weight, bias, running_mean, running_var,
                                     num_batches_tracked, momentum, eps)


def _composed_batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                         eps, num_batches_tracked):
    # Under torch.func transforms: the functional ops with new-style
    # autograd.Functions (see _ops/batch_norm.py), validated first by the same C++
    # checks as batch_norm_train_step.
    ops.check_batch_norm_call(input, weight, bias, running_mean, running_var,
                              num_batches_tracked, training, eps)
    if not training:
        return eval_forward(input, running_mean, running_var, weight, bias, eps)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    output, save_mean, _, unbiased_var = train_forward(input, weight, bias, eps)
    if running_mean is not None and input.numel() > 0:
        if momentum is None and num_batches_tracked is None:
            momentum = 0.0  # torch's factor when nothing is counted
        ops.update_running_stats(running_mean, running_var, save_mean, unbiased_var, momentum,
                                 num_batches_tracked if momentum is None else None)
    return output


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
    memory_saving: bool = False,
) -> Tensor:
    r"""Fused ``act(batch_norm(input) + residual)`` in one forward and one
    backward kernel.

    The batch-norm part has exactly :func:`batch_norm`'s semantics (torch's
    ``F.batch_norm``; Ioffe & Szegedy, 2015); ``residual`` (optional) is added
    to its output, then the activation is applied. The result equals the
    unfused torch ops ``act(F.batch_norm(...) + residual)`` to rounding.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum,
            eps: as in :func:`batch_norm`.
        residual: tensor of ``input``'s shape and dtype (any memory format;
            it is read in the input's), or None.
        activation: ``"identity"``, ``"relu"``, ``"leaky_relu"`` (uses
            ``negative_slope``), ``"elu"`` (alpha 1), ``"silu"``, ``"gelu"``
            (erf) or ``"gelu_tanh"``; formulas as torch's.
        negative_slope: slope of ``leaky_relu`` for negative inputs.
        memory_saving: keep the *output* for backward instead of the input and
            recover :math:`\hat x = (act^{-1}(y) - residual - \beta) / \gamma`
            there (In-Place ABN, Rota Bulò et al., 2018, without mutating
            anything). Needs an invertible activation and no zero in
            ``weight``. Gradients then carry the output's rounding divided by
            :math:`|\gamma|`; float16/bfloat16 outputs make that visible.

    Returns:
        Tensor of ``input``'s shape, dtype and memory format.

    Raises:
        ValueError: as :func:`batch_norm`; an unknown activation;
            ``memory_saving`` with a non-invertible activation, or, on the
            CPU, a zero weight (checked before any buffer changes).
        RuntimeError: on CUDA, ``memory_saving`` with a zero weight: a
            device-side assert in the kernels that read the weight (no host
            synchronisation), reported by the next synchronising call.
        RuntimeError: as :func:`batch_norm`; a residual of another shape,
            dtype or device.

    Double backward is not supported (first derivatives only).
    """
    return _batch_norm_act(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        None, residual, activation, negative_slope, memory_saving,
    )


def _batch_norm_act(
    input, running_mean, running_var, weight, bias, training, momentum, eps,
    num_batches_tracked, residual, activation, negative_slope, memory_saving,
):
    """Shared by ``batch_norm_act`` and the BatchNormAct modules: one op per
    call, as ``_batch_norm`` (validation, then compute, then the buffers)."""
    if not training:
        return ops.batch_norm_act_eval(
            input, running_mean, running_var, weight, bias, residual, eps, activation,
            negative_slope, memory_saving,
        )
    return ops.batch_norm_act_train_step(
        input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
        momentum, eps, activation, negative_slope, memory_saving,
    )
