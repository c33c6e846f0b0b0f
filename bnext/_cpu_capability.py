"""Which CPU kernels run: the instruction-set level, chosen at import.

The CPU kernels are built once per level (setup.py): ``default``, ``avx2``,
``avx512`` and ``avx512_bf16``, each a library ``bnext/_cpu_<level>.so``.
At import bnext loads the highest built level that is no higher than what
torch's own kernels use (``torch.backends.cpu.get_cpu_capability()``, which
honours ``ATEN_CPU_CAPABILITY``), with ``avx512_bf16`` only where the CPU has
AVX512_BF16. ``BNEXT_CPU_CAPABILITY`` (one of the levels) can lower that
choice, never raise it. Every CPU op then calls through that level's table
(csrc/cpu_dispatch.cpp): a library built on one machine runs on any x86-64
CPU instead of dying with SIGILL.
"""

import contextlib
import os

import torch

from . import _C, _build_info

LEVELS = ("default", "avx2", "avx512", "avx512_bf16")
_TORCH_LEVELS = {"AVX2": "avx2", "AVX512": "avx512"}

_current = None


def supported_level():
    """The highest level this process may use (a name from ``LEVELS``).

    Raises:
        ValueError: ``BNEXT_CPU_CAPABILITY`` is set to something else than a
            level name.
    """
    level = _TORCH_LEVELS.get(torch.backends.cpu.get_cpu_capability(), "default")
    if level == "avx512" and _C._cpu_has_avx512_bf16():
        level = "avx512_bf16"
    wanted = os.environ.get("BNEXT_CPU_CAPABILITY", "").strip().lower()
    if wanted:
        if wanted not in LEVELS:
            raise ValueError(f"BNEXT_CPU_CAPABILITY must be one of {', '.join(LEVELS)}, got {wanted!r}")
        level = min(level, wanted, key=LEVELS.index)
    return level


def built_levels():
    """The levels this build of bnext has, lowest first."""
    return tuple(level for level in LEVELS if level in _build_info.CPU_LEVELS)


def _library(level):
    folder = os.path.dirname(os.path.abspath(__file__))
    prefix = f"_cpu_{level}."
    for name in sorted(os.listdir(folder)):
        if name.startswith(prefix) and name.endswith(".so"):
            return os.path.join(folder, name)
    raise ImportError(f"bnext: the {level} CPU kernels ({prefix}*.so) are missing from {folder}; "
                      "rebuild bnext")


def set_level(level):
    """Routes every CPU op through the kernels of ``level`` (which must be
    built and supported here) from now on. For tests and benchmarks; import
    has already chosen the best one.

    Raises:
        ValueError: ``level`` is not built, or is above ``supported_level()``.
    """
    global _current
    if level not in built_levels():
        raise ValueError(f"bnext was built with CPU levels {built_levels()}, not {level!r}")
    if LEVELS.index(level) > LEVELS.index(supported_level()):
        raise ValueError(f"the {level} CPU kernels cannot run here (at most {supported_level()})")
    _current = _C._load_cpu_kernels(_library(level))
    for name, value in _forced.items():  # each level library keeps its own choices
        _C._set_cpu_forced_choice(_CHOICES[name], _VALUES[value])
    return _current


def get_cpu_capability():
    """The instruction-set level of the CPU kernels in use: ``"default"``,
    ``"avx2"``, ``"avx512"`` or ``"avx512_bf16"`` (compare torch's
    ``torch.backends.cpu.get_cpu_capability()``)."""
    return _current


def load_best():
    """Loads the highest built level that this process supports.

    Raises:
        ImportError: this build has no level that the CPU can run (a
            ``BNEXT_CPU_LEVELS=native`` build moved to an older CPU).
    """
    ceiling = supported_level()
    usable = [level for level in built_levels() if LEVELS.index(level) <= LEVELS.index(ceiling)]
    if not usable:
        raise ImportError(
            f"bnext was built with CPU kernels for {', '.join(built_levels())} only, and this "
            f"CPU runs at most {ceiling} (torch: {torch.backends.cpu.get_cpu_capability()}); "
            "rebuild bnext with the default BNEXT_CPU_LEVELS=all")
    return set_level(usable[-1])


_CHOICES = {"streaming_stores": 0, "resident": 1}
_VALUES = {None: -1, False: 0, True: 1}
_forced = {}  # set in-process; applied again when another level is loaded


def set_cpu_tuning(name, value):
    """Forces one of the CPU kernels' memory-traffic choices in this process,
    for tests and measurements; both are automatic by default.

    Args:
        name: ``"streaming_stores"`` (write the outputs of passes larger than
            the usable last-level cache with non-temporal stores) or
            ``"resident"`` (the NCHW training backward's walk over blocks of
            channels kept in cache between its two passes).
        value: ``True`` (wherever the layout allows it), ``False`` (never) or
            ``None`` (automatic: by pass size and the usable cache).

    Returns:
        The previous setting (``True``, ``False`` or ``None``). The initial
        one comes from ``BNEXT_STREAMING_STORES`` / ``BNEXT_RESIDENT``
        (``0`` or ``1``) when set.

    Raises:
        ValueError: an unknown ``name``, or a ``value`` other than those three.
    """
    if name not in _CHOICES:
        raise ValueError(f"set_cpu_tuning: name must be one of {', '.join(_CHOICES)}, got {name!r}")
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"set_cpu_tuning: value must be True, False or None, got {value!r}")
    previous = _C._set_cpu_forced_choice(_CHOICES[name], _VALUES[value])
    if value is None:
        _forced.pop(name, None)
    else:
        _forced[name] = value
    return {-1: None, 0: False, 1: True}[previous]


@contextlib.contextmanager
def cpu_tuning(**choices):
    """``with bnext.cpu_tuning(resident=True, streaming_stores=False): ...``:
    :func:`set_cpu_tuning` for each keyword, restored on exit."""
    previous = {}
    try:
        for name, value in choices.items():
            previous[name] = set_cpu_tuning(name, value)
        yield
    finally:
        for name, value in previous.items():
            set_cpu_tuning(name, value)
