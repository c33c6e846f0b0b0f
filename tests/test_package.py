"""The package's shape: the public API, the old flat import paths, no import
cycles, and the in-process CPU tuning switches."""

import ast
import importlib
import pathlib
import warnings

import pytest
import torch

import bnext
from bnext import _cpu_capability, _moved

PACKAGE = pathlib.Path(bnext.__file__).parent


def test_public_api_is_exported():
    for name in bnext.__all__:
        assert getattr(bnext, name) is not None, name
    assert bnext.BatchNorm2d is bnext.nn.BatchNorm2d
    assert bnext.fold_batchnorm is bnext.tools.fold_batchnorm


@pytest.mark.parametrize("old,new", sorted(_moved.MOVED.items()))
def test_old_import_paths_forward_with_a_warning(old, new):
    module = importlib.import_module(new)
    name = next(n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n])
                and getattr(vars(module)[n], "__module__", "") == new)
    alias = importlib.import_module(old)
    alias._Alias__warned = False
    with pytest.warns(FutureWarning, match=new.replace(".", r"\.")):
        got = getattr(alias, name)
    assert got is getattr(module, name)


def test_pickled_class_paths_still_resolve():
    # A model pickled under the flat layout names bnext.modules.BatchNorm2d.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert importlib.import_module("bnext.modules").BatchNorm2d is bnext.BatchNorm2d


def _imports(path, module):
    """Modules of bnext that `module` (at `path`) imports, lazily or not."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_no_import_cycles():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        parents = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        # A package importing its own submodules, or a module reading its
        # parent package, is how packages work, not a cycle.
        graph[name] = {m for m in _imports(path, name)
                       if m in modules and m != name and m not in parents
                       and not m.startswith(name + ".")}
    state = {}

    def visit(name, stack):
        state[name] = "open"
        for dep in graph[name]:
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(stack + [dep])}"
            if dep not in state:
                visit(dep, stack + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_cpu_tuning_round_trip():
    before = bnext.set_cpu_tuning("resident", True)
    try:
        assert bnext.set_cpu_tuning("resident", False) is True
        with bnext.cpu_tuning(resident=None, streaming_stores=True):
            assert bnext.set_cpu_tuning("resident", None) is None
            assert bnext.set_cpu_tuning("streaming_stores", True) is True
        assert bnext.set_cpu_tuning("resident", False) is False
    finally:
        bnext.set_cpu_tuning("resident", before)


def test_cpu_tuning_survives_a_level_change():
    level = bnext.get_cpu_capability()
    with bnext.cpu_tuning(streaming_stores=True):
        _cpu_capability.set_level(_cpu_capability.built_levels()[0])
        try:
            assert bnext.set_cpu_tuning("streaming_stores", True) is True
        finally:
            _cpu_capability.set_level(level)
        assert bnext.set_cpu_tuning("streaming_stores", True) is True


@pytest.mark.parametrize("name,value", [("streaming", True), ("resident", 1), ("resident", "on")])
def test_cpu_tuning_rejects_bad_arguments(name, value):
    with pytest.raises(ValueError):
        bnext.set_cpu_tuning(name, value)


def test_activation_table_comes_from_the_kernels():
    assert bnext._ops.activations.ACTIVATIONS == (
        "identity", "relu", "leaky_relu", "elu", "silu", "gelu", "gelu_tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        torch.ops.bnext.batch_norm_act_eval(torch.ones(2, 3), torch.zeros(3), torch.ones(3),
                                            None, None, None, 1e-5, "tanh", 0.01, False)
