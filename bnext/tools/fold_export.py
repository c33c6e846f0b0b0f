"""fold_batchnorm for ``torch.export.ExportedProgram``: the same folds as on
modules, applied to the exported graph, then re-exported."""

from types import SimpleNamespace

import torch

from .fold_weights import folded_weight_bias

aten, bnext_ops = torch.ops.aten, torch.ops.bnext

# op -> (position of weight, of bias, of groups or None, kind)
_LAYERS = {
    aten.conv1d.default: (1, 2, 6, "conv"),
    aten.conv2d.default: (1, 2, 6, "conv"),
    aten.conv3d.default: (1, 2, 6, "conv"),
    aten.conv_transpose1d.default: (1, 2, 6, "transposed"),
    aten.conv_transpose2d.input: (1, 2, 6, "transposed"),
    aten.conv_transpose3d.input: (1, 2, 6, "transposed"),
    aten.linear.default: (1, 2, None, "linear"),
}
_DEFAULT_GROUPS = 1


def _bn_args(node):
    """(input, weight, bias, running_mean, running_var, eps) of an eval BN node,
    or None when the node is not one."""
    if node.target == bnext_ops.batch_norm_eval.default:
        x, rm, rv, w, b, eps = node.args
        return x, w, b, rm, rv, eps
    if node.target == aten.batch_norm.default and node.args[5] is False:
        x, w, b, rm, rv, _, _, eps, _ = node.args
        return x, w, b, rm, rv, eps
    return None


def _tensor(gm, arg):
    if arg is None:
        return None
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        mod_path, _, name = arg.target.rpartition(".")
        return getattr(gm.get_submodule(mod_path), name)
    raise _NotConstant


class _NotConstant(Exception):
    pass


def _fold_graph(gm):
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        parsed = _bn_args(node)
        if parsed is None:
            continue
        src, w, b, rm, rv, eps = parsed
        if not (isinstance(src, torch.fx.Node) and src.target in _LAYERS and len(src.users) == 1):
            continue
        w_pos, b_pos, g_pos, kind = _LAYERS[src.target]
        try:
            bn = SimpleNamespace(weight=_tensor(gm, w), bias=_tensor(gm, b), eps=eps,
                                 running_mean=_tensor(gm, rm), running_var=_tensor(gm, rv))
            layer_w = _tensor(gm, src.args[w_pos])
            layer_b = _tensor(gm, src.args[b_pos]) if len(src.args) > b_pos else None
        except _NotConstant:
            continue
        if layer_w.shape[0 if kind != "transposed" else 1] * (
            1 if kind != "transposed" else _groups(src, g_pos)
        ) != bn.running_mean.numel():
            continue
        kind_arg = ("transposed", _groups(src, g_pos)) if kind == "transposed" else kind
        new_w, new_b = folded_weight_bias(layer_w, layer_b, bn, kind_arg)
        names = []
        for suffix, value in (("weight", new_w), ("bias", new_b)):
            name = f"bn_folded_{count}_{suffix}"
            gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
            names.append(name)
        count += 1
        with gm.graph.inserting_before(src):
            w_node, b_node = (gm.graph.get_attr(n) for n in names)
        args = list(src.args) + [None] * max(0, b_pos + 1 - len(src.args))
        args[w_pos], args[b_pos] = w_node, b_node
        src.args = tuple(args)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    _drop_unreferenced_state(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _drop_unreferenced_state(gm):
    # The replaced weights and the BN statistics would otherwise be lifted
    # again as unused inputs of the re-exported program.
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name not in used:
            path, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(path), attr)


def _groups(node, pos):
    return node.args[pos] if len(node.args) > pos else _DEFAULT_GROUPS


def fold_exported(ep, dynamic_shapes=None):
    """Fold eval BNs (bnext's and torch's) into the conv/linear nodes that
    feed them, then re-export with ``ep``'s example inputs (and
    ``dynamic_shapes`` when given; otherwise shapes are static)."""
    if ep.example_inputs is None:
        raise ValueError("the ExportedProgram has no example inputs to re-export with")
    args, kwargs = ep.example_inputs
    gm = _fold_graph(ep.module())
    return torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes)
