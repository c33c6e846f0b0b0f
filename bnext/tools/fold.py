"""Fold eval-mode batch norm into the preceding Conv / ConvTranspose / Linear.

An eval BN is the per-channel affine map ``y = z * scale + shift`` with
``scale = weight / sqrt(running_var + eps)`` and
``shift = bias - running_mean * scale``; when ``z`` is a conv or linear
output, that map folds into the layer's weight and bias (the standard
inference-time fusion, as in ``torch.nn.utils.fusion``).
"""

import copy

import torch
from torch import nn

from ..nn.batchnorm import _BatchNormForward
from ..nn.frozen import _FrozenBatchNorm
from .convert import convert_batchnorm
from .fold_export import fold_exported
from .fold_weights import folded_weight_bias
from .fuse import LeafBNTracer

__all__ = ["fold_batchnorm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = nn.modules.batchnorm._BatchNorm
_PLAIN_FORWARDS = (_BN.forward, nn.SyncBatchNorm.forward, _BatchNormForward.forward,
                   _FrozenBatchNorm.forward)


def _out_channels(layer):
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _is_layer(m):
    return isinstance(m, _CONVS + _TRANSPOSED + (nn.Linear,))


def _is_eval_bn(m):
    if isinstance(m, _FrozenBatchNorm):
        return True
    return isinstance(m, _BN) and not m.training and m.running_mean is not None


def _foldable(layer, bn):
    if not (_is_layer(layer) and _is_eval_bn(bn)):
        return False
    # A subclass with its own forward (say, a fused activation) is not a plain
    # affine map: leave it.
    if type(bn).forward not in _PLAIN_FORWARDS:
        return False
    return _out_channels(layer) == bn.num_features


def fold_into(layer, bn):
    """A copy of ``layer`` with the eval ``bn`` that follows it folded in."""
    if isinstance(layer, nn.Linear):
        kind = "linear"
    elif isinstance(layer, _TRANSPOSED):
        kind = ("transposed", layer.groups)
    else:
        kind = "conv"
    new = copy.deepcopy(layer)
    w, b = folded_weight_bias(layer.weight, layer.bias, bn, kind)
    new.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
    new.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
    return new


def _fold_sequentials(model):
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            layer, bn = module._modules[a], module._modules[b]
            if _foldable(layer, bn):
                module._modules[a] = fold_into(layer, bn)
                module._modules[b] = nn.Identity()
    return model


def _fold_fx(model):
    tracer = LeafBNTracer()
    graph = tracer.trace(model)
    gm = torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        layer, bn = gm.get_submodule(src.target), gm.get_submodule(node.target)
        if not _foldable(layer, bn):
            continue
        folded = fold_into(layer, bn)
        if calls[src.target] == 1:
            target = src.target
        else:  # the layer is called elsewhere too: keep it for those calls
            target = src.target + "_bn_folded"
            while _has_submodule(gm, target):
                target += "_"
            src.target = target
        gm.add_submodule(target, folded)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _has_submodule(gm, target):
    try:
        gm.get_submodule(target)
        return True
    except AttributeError:
        return False


def fold_batchnorm(model, *, dynamic_shapes=None):
    """Return an equivalent inference model with eval batch norms folded into
    the Conv1d/2d/3d (grouped and bias-free included), ConvTranspose1d/2d/3d
    or Linear layer right before them.

    ``model`` is not modified. The result is:

    * a ``torch.fx.GraphModule`` when ``model`` is fx-traceable (any BN
      whose single input is a foldable layer's output, used nowhere else, is
      folded);
    * otherwise a copy of ``model`` in which adjacent (layer, BN) pairs inside
      every ``nn.Sequential`` are folded (the BN slot becomes ``nn.Identity``);
    * for a ``torch.export.ExportedProgram``, the same folds applied to its
      graph (bnext's ``batch_norm_eval`` and aten ``batch_norm`` nodes fed by
      conv / conv_transpose / linear nodes), re-exported with the program's
      example inputs; pass ``dynamic_shapes`` to keep dynamic dimensions.

    A fold needs the BN in eval mode with running statistics (or a frozen BN)
    and channel counts that match. BNs that cannot be folded stay, converted
    to bnext's modules (eval kernels). Folded weights are computed in
    float64 and stored in the layer's dtype; outputs equal the unfolded
    model's within that dtype's rounding.

    Raises:
        ValueError: ``model`` is in training mode (folding freezes the
            statistics, so it only makes sense for inference).
    """
    if isinstance(model, torch.export.ExportedProgram):
        return fold_exported(model, dynamic_shapes)
    if model.training:
        raise ValueError("fold_batchnorm needs an eval model: call model.eval() first")
    model = copy.deepcopy(model)
    try:
        folded = _fold_fx(model)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError):
        folded = _fold_sequentials(model)
    return convert_batchnorm(folded)
