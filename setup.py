"""Builds bnext._C with torch.utils.cpp_extension.

CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources
(csrc/cuda/*.cu and the binding csrc/cuda/*.cpp) are added, with
CUDAExtension, when the installed torch has CUDA and nvcc is found; set
BNEXT_FORCE_CPU=1 to skip them anyway. The CUDA kernels are built for sm_80
and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise (e.g. "9.0" for an
H100/H200 only, which halves the build time).

The CPU kernels use at::vec::Vectorized, whose width is fixed at compile
time. By default the build targets the widest instruction set the *building*
machine has among DEFAULT, AVX2 (+FMA, F16C) and AVX512 (F, BW, VL, DQ), the
same levels torch's own kernels dispatch between at run time (torch picks
AVX512 on the CI VM's Zen 4, so an AVX2 bnext would race it at half the
vector width). AVX512_BF16 is AVX512 plus the AVX512_BF16 extension (Zen 4,
Cooper Lake, Sapphire Rapids and later), which rounds float32 to bfloat16 in
one instruction instead of torch's integer emulation (csrc/cpu/vec_io.h).
BNEXT_CPU_CAPABILITY=default|avx2|avx512|avx512_bf16 overrides the choice.
bnext is built from source where it runs, so this is safe; a binary built
with AVX2 will not run on a CPU without it.
"""

import glob
import os

from setuptools import setup

try:
    from torch.utils import cpp_extension
except ImportError as e:  # isolated build, or torch not installed yet
    raise SystemExit(
        "bnext builds against the installed torch: install torch first "
        "(e.g. `pip install torch==2.13.0`), then run "
        "`pip install --no-build-isolation -e .`"
    ) from e

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    import torch

    if os.environ.get("BNEXT_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


_CAPABILITY_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-mbmi2", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
# Not a level of torch's dispatch: the same AVX512 Vectorized, with the
# compiler allowed the bfloat16 conversion instructions (__AVX512BF16__).
_CAPABILITY_FLAGS["avx512_bf16"] = _CAPABILITY_FLAGS["avx512"] + ["-mavx512bf16"]


def _cpu_capability():
    cap = os.environ.get("BNEXT_CPU_CAPABILITY", "auto").lower()
    if cap != "auto":
        if cap not in _CAPABILITY_FLAGS:
            raise SystemExit(f"BNEXT_CPU_CAPABILITY must be one of {sorted(_CAPABILITY_FLAGS)} or auto")
        return cap
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(l for l in f if l.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "default"
    avx2 = {"avx2", "fma", "f16c", "bmi2"}
    if avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    return "avx2" if avx2 <= flags else "default"


def cxx_flags(capability):
    """Host compiler flags for the C++ sources (tools/check_torch_versions.py
    compiles with the same)."""
    # at::parallel_for expands to `#pragma omp parallel` in our own object
    # files, so OpenMP must be on here; libgomp resolves to the copy torch
    # already loaded (same soname).
    # -fno-tree-loop-distribute-patterns: GCC otherwise turns the zeroing
    # loop of a kernel's accumulator array into a memset, and the array then
    # lives on the stack (slower planar statistics on small bfloat16 planes).
    return ["-O3", "-fopenmp", "-fno-tree-loop-distribute-patterns"] + _CAPABILITY_FLAGS[capability]


def _extension():
    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    capability = _cpu_capability()
    print(f"bnext: building CPU kernels for {capability}")
    cxx = cxx_flags(capability)
    link_flags = ["-fopenmp"]
    if _want_cuda() and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"bnext: building CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
        return cpp_extension.CUDAExtension(
            "bnext._C",
            cpu_sources + cuda_sources,
            # -lineinfo: compute-sanitizer and ncu name source lines; it adds
            # no code, only line tables.
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    return cpp_extension.CppExtension(
        "bnext._C",
        cpu_sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link_flags,
    )


# pip's build backend and `python setup.py` both run this file as __main__;
# tools/check_torch_versions.py imports it for cxx_flags alone.
if __name__ == "__main__":
    setup(
        ext_modules=[_extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )
