"""Fast reads of a module's parameters and buffers."""


def member(module, table, name):
    """``getattr(module, name)`` for a parameter or buffer held in ``table``
    (``module._parameters`` or ``module._buffers``), without
    ``nn.Module.__getattr__``: that Python fallback costs ~1.5 us per lookup
    on Python 3.11, and a batch-norm call makes four to six of them, as much
    as the whole op on a small input. Where the name is not in the table (a
    parametrization's property, an attribute set by a hook, as weight_norm
    does) the normal lookup runs."""
    return table[name] if name in table else getattr(module, name)
