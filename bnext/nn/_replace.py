"""Replacing modules in a model in place: what the converters (bnext.tools)
and ``SyncBatchNorm.convert_sync_batchnorm`` share."""

import torch


def retyped(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A new object of class ``cls`` holding the very same Parameter and
    buffer objects (so optimizers keep working) and every other attribute:
    hooks, train/eval flag, device, dtype. Containers are copied so the old
    and new modules do not share dicts."""
    new = cls.__new__(cls)
    new.__dict__ = {
        k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()
    }
    return new


def replace_modules(module: torch.nn.Module, replace, memo=None) -> torch.nn.Module:
    """Apply ``replace(m) -> new module or None (keep m)`` to every module,
    children in place; a module used twice is replaced by one new module."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = replace(module)
    out = module if new is None else new
    memo[id(module)] = out
    for name, child in list(out._modules.items()):
        if child is not None:
            out._modules[name] = replace_modules(child, replace, memo)
    return out
