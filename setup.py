"""Builds bnext's compiled parts with torch.utils.cpp_extension.

bnext._C holds the op schemas, the C++ autograd kernels, the argument
checks, the CPU ops' registration and, when built, the CUDA kernels; it is
compiled for the baseline x86-64 instruction set. The CPU kernels use
at::vec::Vectorized, whose width is fixed at compile time, so they are
compiled once per level of torch's own run-time dispatch, each into a
library of its own, bnext/_cpu_<level>.so:

  default      baseline x86-64 (SSE2)
  avx2         AVX2, FMA, F16C, BMI2
  avx512       AVX-512 F, BW, VL, DQ (+ the avx2 set)
  avx512_bf16  avx512 plus AVX512_BF16, which rounds float32 to bfloat16 in
               one instruction (Zen 4, Cooper Lake, Sapphire Rapids and
               later; csrc/cpu/vec_io.h)

At import, bnext loads the highest level that the running CPU and torch
allow (bnext/_cpu_capability.py), so one build runs on every x86-64 CPU.
BNEXT_CPU_LEVELS=native builds only the building machine's level (a faster
developer build whose result runs only on such CPUs); a comma-separated list
builds those levels. The default, "all", is the portable build.

CUDA sources (csrc/cuda/*.cu and the binding csrc/cuda/*.cpp) are added to
bnext._C, with CUDAExtension, when the installed torch has CUDA and nvcc is
found; BNEXT_FORCE_CPU=1 skips them. They are built for sm_80 and sm_90
unless TORCH_CUDA_ARCH_LIST says otherwise (e.g. "9.0" for an H100/H200
only, which halves the build time).

The build records the torch it was built against in bnext/_build_info.py
and in the version's local tag (0.1.0+torch2.13.0); importing bnext under
another torch raises ImportError naming both.
"""

import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as e:  # isolated build, or torch not installed yet
    raise SystemExit(
        "bnext builds against the installed torch: install torch first "
        "(e.g. `pip install torch==2.13.0`), then run "
        "`pip install --no-build-isolation -e .`"
    ) from e

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    if os.environ.get("BNEXT_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


LEVELS = ("default", "avx2", "avx512", "avx512_bf16")
_LEVEL_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-mbmi2", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
# Not a level of torch's dispatch: the same AVX512 Vectorized, with the
# compiler allowed the bfloat16 conversion instructions (__AVX512BF16__).
_LEVEL_FLAGS["avx512_bf16"] = _LEVEL_FLAGS["avx512"] + ["-mavx512bf16"]


def native_level():
    """The building machine's highest level (/proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(l for l in f if l.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "default"
    avx2 = {"avx2", "fma", "f16c", "bmi2"}
    if avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    return "avx2" if avx2 <= flags else "default"


def build_levels():
    spec = os.environ.get("BNEXT_CPU_LEVELS", "all").lower().strip()
    if spec == "all":
        return list(LEVELS)
    if spec == "native":
        return [native_level()]
    wanted = {s.strip() for s in spec.split(",") if s.strip()}
    if not wanted or wanted - set(LEVELS):
        raise SystemExit(f"BNEXT_CPU_LEVELS must be all, native or a list from {LEVELS}")
    return [level for level in LEVELS if level in wanted]


def cxx_flags(level):
    """Host compiler flags of a CPU level library (tools/check_torch_versions.py
    compiles with the same)."""
    # at::parallel_for expands to `#pragma omp parallel` in our own object
    # files, so OpenMP must be on here; libgomp resolves to the copy torch
    # already loaded (same soname).
    # -fno-tree-loop-distribute-patterns: GCC otherwise turns the zeroing
    # loop of a kernel's accumulator array into a memset, and the array then
    # lives on the stack (slower planar statistics on small bfloat16 planes).
    return (["-O3", "-fopenmp", "-fno-tree-loop-distribute-patterns", f"-DBNEXT_CPU_LEVEL={level}"]
            + _LEVEL_FLAGS[level])


# Host sources of each library. The checks, layout and activation names are
# compiled into every library that calls them, so that a level library needs
# nothing from bnext._C.
SHARED_SOURCES = ["csrc/activation_kind.cpp", "csrc/channel_layout.cpp", "csrc/checks.cpp"]


def source_groups():
    return {"_C": _sources("csrc/*.cpp"), "_cpu": _sources("csrc/cpu/*.cpp") + SHARED_SOURCES}


def _write_build_info(levels, cuda):
    with open(os.path.join(ROOT, "bnext", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py when bnext is built (not in git)."""\n\n'
                f"TORCH_VERSION = {torch.__version__!r}\n"
                f"CPU_LEVELS = {tuple(levels)!r}\n"
                f"CUDA = {cuda!r}\n")


# Python's CFLAGS compile with -g: left in, the DWARF of four levels of
# template-heavy kernels makes a wheel of ~500 MB. Symbol names stay.
_LINK_FLAGS = ["-Wl,--strip-debug"]


def _extensions():
    groups = source_groups()
    levels = build_levels()
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    cuda = _want_cuda() and bool(cuda_sources)
    print(f"bnext: building CPU kernels for {', '.join(levels)}")
    _write_build_info(levels, cuda)
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"bnext: building CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
        main = cpp_extension.CUDAExtension(
            "bnext._C",
            groups["_C"] + cuda_sources,
            # -lineinfo: compute-sanitizer and ncu name source lines; it adds
            # no code, only line tables.
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=_LINK_FLAGS,
        )
    else:
        main = cpp_extension.CppExtension("bnext._C", groups["_C"], extra_compile_args={"cxx": ["-O3"]},
                                          extra_link_args=_LINK_FLAGS)
    per_level = [
        cpp_extension.CppExtension(
            f"bnext._cpu_{level}",
            groups["_cpu"],
            extra_compile_args={"cxx": cxx_flags(level)},
            extra_link_args=["-fopenmp"] + _LINK_FLAGS,
        )
        for level in levels
    ]
    return [main] + per_level


class _BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    def build_extension(self, ext):
        # The libraries compile some of the same sources with other flags:
        # an object folder each keeps them apart, and ninja's rebuilds minimal.
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


# pip's build backend and `python setup.py` both run this file as __main__;
# tools/check_torch_versions.py imports it for its flags and sources alone.
if __name__ == "__main__":
    setup(
        version=f"{VERSION}+torch{torch.__version__.split('+')[0]}",
        ext_modules=_extensions(),
        cmdclass={"build_ext": _BuildExtension},
    )
