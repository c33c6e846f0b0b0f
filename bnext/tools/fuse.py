"""Fusing BN -> activation and BN -> add -> activation into BatchNormAct.

Two ways to find the patterns, tried per module from the root down:

* ``torch.fx``: trace the module with every BN as a leaf; a BN call whose
  only user is an activation (module, function or ``.relu()``), or an add
  whose only user is an activation, becomes one ``BatchNormAct`` call
  ``bn_act(x, residual)``. The module is returned as a ``GraphModule``, but
  only if something was fused.
* an ``nn.Sequential``: adjacent (BN, activation) pairs are fused in place
  (the activation's slot becomes ``nn.Identity``; it stays a Sequential),
  then its children are tried in turn. So are the children of a module that
  does not trace; untraceable code is left as it is.
"""

import torch
from torch import nn

from .._ops import activations as _activations
from ..nn._replace import retyped
from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..nn.batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ..nn.frozen import _FrozenBatchNorm

_BN = nn.modules.batchnorm._BatchNorm
_FUSED = {
    nn.BatchNorm1d: BatchNormAct1d,
    nn.BatchNorm2d: BatchNormAct2d,
    nn.BatchNorm3d: BatchNormAct3d,
    BatchNorm1d: BatchNormAct1d,
    BatchNorm2d: BatchNormAct2d,
    BatchNorm3d: BatchNormAct3d,
}
# What a failed symbolic trace raises (data-dependent control flow, calls fx
# cannot proxy, ...).
_TRACE_ERRORS = (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError,
                 AttributeError, ValueError)


class LeafBNTracer(torch.fx.Tracer):
    # bnext's modules live outside torch.nn, so fx would trace into their
    # Python checks; every BN is a leaf.
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (_BN, _FrozenBatchNorm)) or super().is_leaf_module(m, qualname)


def _fused_module(bn, spec, memory_saving):
    activation, negative_slope = spec
    new = retyped(bn, _FUSED[type(bn)])  # same Parameter and buffer objects
    new.activation = activation
    new.negative_slope = negative_slope
    new.memory_saving = memory_saving and _activations.invertible(activation, negative_slope)
    return new


def _activation_spec(gm, node, src):
    """(activation, negative_slope) if `node` applies an activation to `src`."""
    if not node.args or node.args[0] is not src:
        return None
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs:
            return None
        return _activations.from_module(gm.get_submodule(node.target))
    if node.op in ("call_function", "call_method"):
        return _activations.from_call(node.target, node.args, node.kwargs)
    return None


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _match(gm, bn_node):
    """(activation node, residual node or None, add node or None, spec)."""
    user = _only_user(bn_node)
    if user is None:
        return None
    if (user.op == "call_function" and user.target in _activations.ADDS
            and len(user.args) == 2 and not user.kwargs):
        a, b = user.args
        residual = b if a is bn_node else a
        act = _only_user(user)
        if isinstance(residual, torch.fx.Node) and residual is not bn_node and act is not None:
            spec = _activation_spec(gm, act, user)
            if spec is not None:
                return act, residual, user, spec
        return None
    spec = _activation_spec(gm, user, bn_node)
    return (user, None, None, spec) if spec is not None else None


def _fuse_fx(module, memory_saving):
    tracer = LeafBNTracer()
    graph = tracer.trace(module)  # raises one of _TRACE_ERRORS if untraceable
    gm = torch.fx.GraphModule(tracer.root, graph, module.__class__.__name__)
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1:
            continue  # a BN called twice would need two modules
        bn = gm.get_submodule(node.target)
        if type(bn) not in _FUSED or len(node.args) != 1 or node.kwargs:
            continue
        found = _match(gm, node)
        if found is None:
            continue
        act, residual, add, spec = found
        gm.add_submodule(node.target, _fused_module(bn, spec, memory_saving))
        args = (node.args[0],) if residual is None else (node.args[0], residual)
        with gm.graph.inserting_before(act):
            call = gm.graph.call_module(node.target, args)
        act.replace_all_uses_with(call)
        for dead in (act, add, node):
            if dead is not None:
                gm.graph.erase_node(dead)
        fused += 1
    if not fused:
        return module
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _fuse_sequential(seq, memory_saving):
    names = list(seq._modules)
    for a, b in zip(names, names[1:]):
        bn, act = seq._modules[a], seq._modules[b]
        spec = _activations.from_module(act) if type(bn) in _FUSED else None
        if spec is not None:
            seq._modules[a] = _fused_module(bn, spec, memory_saving)
            seq._modules[b] = nn.Identity()


def fuse_activations(module, memory_saving=False):
    """`module` with its BN -> (add ->) activation patterns fused; see the
    module docstring. Children are replaced in place."""
    if isinstance(module, _BN) or not module._modules:
        return module  # a leaf: nothing inside to fuse
    if isinstance(module, nn.Sequential):
        # A chain: adjacent pairs are all there is, and it stays a Sequential.
        _fuse_sequential(module, memory_saving)
    else:
        try:
            return _fuse_fx(module, memory_saving)
        except _TRACE_ERRORS:
            pass
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = fuse_activations(child, memory_saving)
    return module
