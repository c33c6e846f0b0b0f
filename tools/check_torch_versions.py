"""Compiles every bnext source against other torch versions' headers.

bnext builds against the installed torch; this checks that the sources also
compile against the torch a user (or the GPU machine) has, without installing
it: a torch wheel is downloaded with `pip download --no-deps` (a CUDA build,
~0.5 GB, cached), its headers and core libraries are unpacked, and

  * every C++ translation unit (csrc/*.cpp, csrc/cpu/*.cpp, csrc/cuda/*.cpp)
    is compiled with the flags setup.py uses, at the C++ standard that
    version's BuildExtension passes (read from its own cpp_extension.py:
    C++17 up to 2.12, C++20 from 2.13);
  * with --link (the default), the objects are linked into one shared object
    against that version's libc10/libtorch/libtorch_cpu/libtorch_python with
    --no-undefined, so a symbol the version does not export fails here;
  * every CUDA kernel file (csrc/cuda/*.cu, which include no torch header)
    is compiled with nvcc for sm_90 at the same C++ standard.

    python tools/check_torch_versions.py --version 2.11.0 --version 2.14.1
    python tools/check_torch_versions.py --wheel path/to/torch-....whl --no-link

Writes a JSON record (--out, default benchmarks/results/torch_versions.json)
and exits non-zero if anything fails to compile or link.
"""

import argparse
import concurrent.futures
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("BNEXT_TORCH_CACHE", Path.home() / ".cache" / "bnext-torch"))
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
LIBS = ("libc10.so", "libtorch.so", "libtorch_cpu.so", "libtorch_python.so")


def _setup_module():
    spec = importlib.util.spec_from_file_location("bnext_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module


def fetch_wheel(version):
    """Path of torch==version's wheel for this Python, downloaded once."""
    folder = CACHE / "wheels"
    found = sorted(folder.glob(f"torch-{version}-*.whl")) if folder.exists() else []
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"torch=={version}",
                        "-d", str(folder)], check=True)
        found = sorted(folder.glob(f"torch-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip download gave no wheel for torch=={version}")
    return found[-1]


def unpack(wheel):
    """Unpacks the headers, the four core libraries and cpp_extension.py of
    `wheel`; returns (version, folder holding torch/)."""
    with zipfile.ZipFile(wheel) as z:
        version_py = z.read("torch/version.py").decode()
        version = re.search(r"__version__ = '([^']+)'", version_py).group(1)
        dest = CACHE / f"torch-{version}"
        if not (dest / "done").exists():
            wanted = [n for n in z.namelist()
                      if n.startswith("torch/include/") or n == "torch/utils/cpp_extension.py"
                      or n in {f"torch/lib/{lib}" for lib in LIBS}]
            z.extractall(dest, wanted)
            (dest / "done").write_text(str(wheel))
    return version, dest


def cxx_standard(dest):
    """The -std= that this torch's BuildExtension passes on Linux."""
    text = (dest / "torch" / "utils" / "cpp_extension.py").read_text()
    m = re.search(r"common_cflags \+= \['-std=(c\+\+\d+)'", text)
    return m.group(1) if m else "c++17"


def _run(cmd):
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return {"cmd": " ".join(map(str, cmd)), "rc": proc.returncode,
            "seconds": round(time.monotonic() - t0, 1),
            "stderr": proc.stderr[-4000:] if proc.returncode else ""}


def check(wheel, link, jobs):
    version, dest = unpack(wheel)
    std = cxx_standard(dest)
    setup = _setup_module()
    level = setup.native_level()
    include = dest / "torch" / "include"
    build = CACHE / f"build-{version}"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    common = [f"-std={std}", "-fPIC", "-O0", "-DTORCH_API_INCLUDE_EXTENSION_H",
              "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1", "-isystem", str(include),
              "-isystem", str(include / "torch" / "csrc" / "api" / "include"),
              f"-I{sysconfig.get_paths()['include']}", f"-I{CUDA_HOME}/include"]
    # As setup.py builds them: bnext._C at the baseline, the CPU kernels at
    # this machine's level (one level library stands for all four here).
    groups = {"_C": (setup.source_groups()["_C"] + [str(p.relative_to(ROOT))
                                                   for p in sorted(ROOT.glob("csrc/cuda/*.cpp"))], []),
              "_cpu": (setup.source_groups()["_cpu"],
                       [f for f in setup.cxx_flags(level) if f != "-O3"])}
    jobs_list = []
    for group, (sources, flags) in groups.items():
        for rel in sources:
            src = ROOT / rel
            obj = build / group / (rel.replace("/", "_") + ".o")
            obj.parent.mkdir(exist_ok=True)
            mode = ["-c", "-o", str(obj)] if link else ["-fsyntax-only"]
            jobs_list.append((group, src, ["g++", *common, *flags, *mode, str(src)], obj))
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    for src in sorted(ROOT.glob("csrc/cuda/*.cu")):
        obj = build / "_C" / (src.name + ".o")
        jobs_list.append(("_C", src, [nvcc, f"-std={std}", "-O3", "-Xcompiler", "-fPIC",
                                      "-gencode=arch=compute_90,code=sm_90", "-c", str(src), "-o",
                                      str(obj)], obj))
    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_run, cmd): (group, src) for group, src, cmd, _ in jobs_list}
        for fut in concurrent.futures.as_completed(futures):
            group, src = futures[fut]
            name = f"{group}: {src.relative_to(ROOT)}"
            results[name] = r = fut.result()
            print(f"  {'ok  ' if r['rc'] == 0 else 'FAIL'} {name} ({r['seconds']} s)", flush=True)
    record = {"torch": version, "wheel": Path(wheel).name, "cxx_standard": std,
              "cpu_level": level, "compiled": results}
    ok = all(r["rc"] == 0 for r in results.values())
    if link and ok:
        lib = dest / "torch" / "lib"
        # An extension leaves Python's own symbols to the interpreter; naming
        # libpython here lets --no-undefined check everything else.
        python = [f"-L{sysconfig.get_config_var('LIBDIR')}",
                  f"-l:{sysconfig.get_config_var('LDLIBRARY')}"]
        record["link"] = {}
        for group in groups:
            objs = [str(obj) for g, _, _, obj in jobs_list if g == group]
            r = _run(["g++", "-shared", "-o", str(build / f"{group}.so"), *objs, "-fopenmp",
                      f"-L{lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", *python,
                      f"-L{CUDA_HOME}/lib64", "-lcudart", "-Wl,--no-undefined"])
            record["link"][group] = r
            print(f"  {'ok  ' if r['rc'] == 0 else 'FAIL'} link {group} against torch {version}",
                  flush=True)
            if r["rc"]:
                ok = False
                print(r["stderr"][-2000:])
    record["ok"] = ok
    for path, r in results.items():
        if r["rc"]:
            print(f"--- {path}\n{r['stderr'][-2000:]}")
    shutil.rmtree(build, ignore_errors=True)
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description="compile bnext against other torch versions' headers")
    p.add_argument("--version", action="append", default=[], help="torch version to pip download")
    p.add_argument("--wheel", action="append", default=[], help="a torch wheel already on disk")
    p.add_argument("--no-link", dest="link", action="store_false",
                   help="-fsyntax-only for the C++ files, no link check")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "torch_versions.json"))
    args = p.parse_args(argv)
    if args.link and not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        p.error("this Python has no shared libpython to link the check against: use --no-link")
    wheels = [Path(w) for w in args.wheel] + [fetch_wheel(v) for v in args.version]
    if not wheels:
        p.error("give --version or --wheel")
    records = []
    for wheel in wheels:
        print(f"{wheel.name}:", flush=True)
        records.append(check(wheel, args.link, args.jobs))
    import torch

    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "built_with_torch": torch.__version__,
           "gcc": subprocess.run(["g++", "-dumpfullversion"], capture_output=True, text=True).stdout.strip(),
           "results": records}
    for r in records:
        for v in list(r["compiled"].values()) + list(r.get("link", {}).values()):
            v.pop("cmd", None)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
    for r in records:
        print(f"torch {r['torch']} ({r['cxx_standard']}): {'OK' if r['ok'] else 'FAILED'}")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
