"""The torch this build of bnext was compiled against, checked at import:
a C++ extension works only with the torch whose headers it was built with,
and otherwise fails with an undefined symbol or worse."""

import torch


def base_version(version):
    """'2.13.0+cpu' -> '2.13.0': CPU and CUDA wheels of one release share the
    C++ ABI that bnext uses."""
    return str(version).split("+", 1)[0]


def check_torch_version(running, built):
    """Raises ImportError naming both versions when they differ."""
    if base_version(running) != base_version(built):
        raise ImportError(
            f"bnext was built against torch {built} but torch {running} is installed; "
            "rebuild bnext for this torch (pip install --no-build-isolation -e . or "
            "pip wheel --no-build-isolation --no-deps .), or install torch "
            f"{base_version(built)}")


def load_build_info():
    try:
        from . import _build_info
    except ImportError as e:
        raise ImportError(
            "bnext is not built: run `pip install --no-build-isolation -e .` (see README.md)") from e
    check_torch_version(torch.__version__, _build_info.TORCH_VERSION)
    return _build_info
