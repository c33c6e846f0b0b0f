"""Import paths of bnext 0.1's flat layout, kept working.

``bnext.modules`` and its siblings became ``bnext.nn.*`` (modules) and
``bnext.tools.*`` (model tools). Each old name is an alias module in
``sys.modules`` that forwards attribute reads to the new module and warns
once with the new path, so ``import bnext.sync`` and
``from bnext.fold import fold_batchnorm`` keep working.
"""

import importlib
import sys
import types
import warnings

MOVED = {
    "bnext.modules": "bnext.nn.batchnorm",
    "bnext.batchnorm_act": "bnext.nn.batchnorm_act",
    "bnext.frozen": "bnext.nn.frozen",
    "bnext.sync": "bnext.nn.sync",
    "bnext.convert": "bnext.tools.convert",
    "bnext.fold": "bnext.tools.fold",
    "bnext.freeze": "bnext.tools.freeze",
    "bnext.recalibrate": "bnext.tools.recalibrate",
}


class _Alias(types.ModuleType):
    def __init__(self, old, new):
        super().__init__(old, f"Moved to {new}.")
        self.__path_new = new
        self.__warned = False

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if not self.__warned:
            self.__warned = True
            warnings.warn(f"{self.__name__} moved to {self.__path_new}; import it from there "
                          "(or use the names exported by bnext)", FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(self.__path_new), name)

    def __dir__(self):
        return dir(importlib.import_module(self.__path_new))


def install(package):
    """Register every alias as a submodule of ``package`` (bnext)."""
    for old, new in MOVED.items():
        alias = _Alias(old, new)
        sys.modules[old] = alias
        setattr(package, old.rpartition(".")[2], alias)
