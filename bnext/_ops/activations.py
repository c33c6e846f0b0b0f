"""The activations the fused BatchNormAct ops support, and how torch's own
activation modules and functions map onto them (used by the converter).

The names and which of them are invertible come from the C++ table
(``csrc/activation_kind.h``) that both backends read."""

import operator

import torch
import torch.nn.functional as F
from torch import nn

from .. import _C

#: Names accepted by ``activation=``; ``elu`` is torch's ELU with alpha=1.
ACTIVATIONS = _C._activation_names()


def invertible(activation, negative_slope):
    """Whether the activation's input can be recovered from its output:
    identity, elu, leaky_relu with a positive slope."""
    return _C._activation_invertible(activation, float(negative_slope))


def check_activation(activation, negative_slope, memory_saving):
    """ValueError for an unknown activation, or memory_saving with one that
    cannot be inverted."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"bnext: unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}"
        )
    if memory_saving and not invertible(activation, negative_slope):
        raise ValueError(
            "bnext: memory_saving=True recovers the normalized input from the output in "
            "backward, so the activation must be invertible: identity, elu, or leaky_relu "
            f"with negative_slope > 0; got activation={activation!r}, "
            f"negative_slope={negative_slope}. relu, silu and gelu lose information "
            "(relu maps every negative input to 0; silu and gelu are not one-to-one)."
        )


def from_module(m):
    """(activation, negative_slope) for a torch activation module, or None."""
    t = type(m)
    if t is nn.ReLU:
        return "relu", 0.01
    if t is nn.LeakyReLU:
        return "leaky_relu", float(m.negative_slope)
    if t is nn.ELU and m.alpha == 1.0:
        return "elu", 0.01
    if t is nn.SiLU:
        return "silu", 0.01
    if t is nn.GELU:
        return ("gelu_tanh" if m.approximate == "tanh" else "gelu"), 0.01
    return None


_RELU_FNS = (F.relu, torch.relu, torch.relu_, F.relu_)


def from_call(fn, args, kwargs):
    """(activation, negative_slope) for an fx call_function / call_method of
    an activation whose only tensor argument is ``args[0]``, or None."""
    extra = dict(kwargs)
    extra.pop("inplace", None)
    if fn in _RELU_FNS or fn == "relu" or fn == "relu_":
        return ("relu", 0.01) if len(args) <= 2 and not extra else None
    if fn is F.leaky_relu:
        slope = args[1] if len(args) > 1 else extra.pop("negative_slope", 0.01)
        if len(args) > 3 or extra or not isinstance(slope, (int, float)):
            return None
        return "leaky_relu", float(slope)
    if fn is F.elu:
        alpha = args[1] if len(args) > 1 else extra.pop("alpha", 1.0)
        return ("elu", 0.01) if alpha == 1.0 and len(args) <= 3 and not extra else None
    if fn is F.silu:
        return ("silu", 0.01) if len(args) <= 2 and not extra else None
    if fn is F.gelu:
        approximate = extra.pop("approximate", "none")
        if len(args) != 1 or extra or approximate not in ("none", "tanh"):
            return None
        return ("gelu_tanh" if approximate == "tanh" else "gelu"), 0.01
    return None


ADDS = (operator.add, operator.iadd, torch.add)
