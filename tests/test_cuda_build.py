"""The CUDA sources compile and link, on machines without a GPU.

CI has nvcc (the CUDA toolkit) but a CPU-only torch, so the CUDA kernels
never run there; this test keeps them from rotting between GPU sessions:
every ``csrc/cuda/*.cu`` is compiled with nvcc for sm_80 and sm_90, the
binding (``csrc/cuda/ops_cuda.cpp``, which includes no CUDA header of torch)
with the host compiler, and everything is linked into a shared object with
``--no-undefined`` against torch, the CUDA runtime and the built ``bnext._C``
(which provides the shared checks), so a launcher declared but not defined
fails here.
"""

import concurrent.futures
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

import bnext

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CUDA_HOME = cpp_extension.CUDA_HOME or "/usr/local/cuda"
NVCC = shutil.which("nvcc") or os.path.join(CUDA_HOME, "bin", "nvcc")
ARCHS = ("80", "90")

pytestmark = pytest.mark.skipif(
    not os.path.exists(NVCC), reason="needs nvcc (the CUDA toolkit)"
)


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}"
    # Our own sources must compile without warnings (torch's headers are
    # included as system headers, so theirs do not count).
    ours = [l for l in proc.stderr.splitlines() if "warning" in l and "csrc/" in l]
    assert not ours, "\n".join(ours)


def _nvcc(src, obj):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    _run([NVCC, "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-Wall", *gencode,
          "-c", str(src), "-o", str(obj)])


def _host(src, obj):
    includes = []
    for path in cpp_extension.include_paths():
        includes += ["-isystem", path]
    _run(["g++", "-std=c++20", "-O1", "-fPIC", "-Wall", "-Wextra", *includes,
          f"-I{os.path.join(CUDA_HOME, 'include')}",
          f"-I{sysconfig.get_paths()['include']}", "-c", str(src), "-o", str(obj)])


def test_cuda_sources_compile_and_link(tmp_path):
    kernels = sorted(CUDA_DIR.glob("*.cu"))
    bindings = sorted(CUDA_DIR.glob("*.cpp"))
    assert kernels and bindings
    jobs = [(_nvcc, src, tmp_path / f"{src.stem}.cu.o") for src in kernels]
    jobs += [(_host, src, tmp_path / f"{src.stem}.o") for src in bindings]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(fn, src, obj) for fn, src, obj in jobs]:
            future.result()

    torch_lib = cpp_extension.library_paths()[0]
    extension = Path(bnext._C.__file__)
    _run(["g++", "-shared", "-o", str(tmp_path / "bnext_cuda_link_check.so"),
          *[str(obj) for _, _, obj in jobs], str(extension),
          f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch",
          f"-L{os.path.join(CUDA_HOME, 'lib64')}", "-lcudart", "-Wl,--no-undefined"])
