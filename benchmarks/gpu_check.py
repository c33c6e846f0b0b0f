"""First contact with a GPU: build, verify, sanitize and measure every bnext
CUDA op in one prepared command (issue #29).

    python -m benchmarks.gpu_check --out DIR                      # every step
    python -m benchmarks.gpu_check --out DIR --steps sanitize,bench  # a rerun
    python -m benchmarks.gpu_check --out DIR --rehearse           # here, no GPU

The steps run in order, each as subprocesses with its own time budget
(seconds, scaled by --budget-scale), and none starts past --deadline:

  versions  torch, CUDA, cuDNN, driver, GPU name, SM count, L2 size, nvcc,
            compute-sanitizer
  build     setup.py build_ext --inplace for --arch only (default 9.0),
            MAX_JOBS = the machine's cores, nvcc -lineinfo (setup.py always
            adds it, for the sanitizer's source lines), the CPU kernels for
            the machine's own level only (BNEXT_CPU_LEVELS=native); the build
            folder, build/gpu_check, is reused by a rerun on the same machine
  tests     tests/test_gpu_cases.py and tests/test_cuda_graphs.py on CUDA,
            then the rest of the suite's CUDA variants (test_cuda_build
            excluded: it recompiles every .cu for two architectures)
  sanitize  compute-sanitizer memcheck (every case of
            tests/cuda_sanitize_subset.py), racecheck and synccheck (--quick),
            with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that memcheck sees each
            tensor's own bounds
  bench     benchmarks.bench on ResNet-50's BN shapes at batch 256: fp16,
            bf16, fp32, NCHW and channels_last, fwd/fwdbwd/eval, bnext vs torch
            eager; torch.compile on a subset; fused BN+ReLU and BN+add+ReLU

DIR receives at most eight files, as the device tool returns them:
summary.json (versions, every step's status, time, budget and findings),
summary.txt (the screen printed at the end), logs.tar.gz (every log, the
pytest and sanitizer output, the benchmark JSON/PNG/tables; rewritten after
each step, so a run cut short still returns what it did), and bench.json /
bench.png (the main benchmark). The working folder is --work (default
build/gpu_check_out). Exits 0 when every step that ran passed.

--rehearse runs the same driver on a machine without a GPU: the tests step
collects the CUDA selection (all skipped), the sanitizer step lists its cases,
the build step is skipped when bnext is already built, and the benchmark runs
a tiny CPU grid; summary.json has the same form.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds per step on the GPU machine (16 cores, H100/H200). They add up to
# 8 minutes, and --deadline (also 8 minutes) squeezes the last steps when an
# early one runs long: a session's 15 device minutes then hold the machine's
# start, this command and one rerun.
BUDGETS = {"versions": 15, "build": 150, "tests": 120, "sanitize": 90, "bench": 110}
STEPS = tuple(BUDGETS)

VERSIONS_SCRIPT = r"""
import json, os, platform, shutil, subprocess, torch
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
info = {"python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "nvcc": (run(["nvcc", "--version"]) or "").splitlines()[-1:] or None,
        "compute_sanitizer": (run(["compute-sanitizer", "--version"]) or "").splitlines()[-1:] or None,
        "git_commit": run(["git", "rev-parse", "--short", "HEAD"])}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                l2_bytes=getattr(p, "L2_cache_size", None), memory_bytes=p.total_memory,
                cudnn=torch.backends.cudnn.version(),
                driver=run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
print("VERSIONS " + json.dumps(info))
"""

REGISTERED_SCRIPT = (
    "import torch, bnext; print('CUDA kernels registered:', "
    "torch._C._dispatch_has_kernel_for_dispatch_key('bnext::batch_norm_train', 'CUDA'))"
)


class Driver:
    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.work)
        self.out = os.path.abspath(args.out)
        self.start = time.monotonic()
        self.summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "label": args.label,
                        "rehearsal": args.rehearse, "argv": sys.argv[1:], "steps": {}}
        os.makedirs(self.work, exist_ok=True)
        os.makedirs(self.out, exist_ok=True)

    def remaining(self):
        return self.args.deadline - (time.monotonic() - self.start)

    def sh(self, name, cmd, timeout, env=None):
        """Runs cmd (a list) with output to work/<name>.log; returns
        (returncode or 'timeout', log text)."""
        log = os.path.join(self.work, f"{name}.log")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(log, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n# env: {env or {}}\n# timeout: {timeout:.0f} s\n")
            f.flush()
            try:
                # A session of its own, so that a timeout also ends what the
                # command started (pytest-xdist workers, the sanitized python).
                proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=f,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                f.write(f"\n# could not start: {e}\n")
                rc = "not found"
            else:
                try:
                    rc = proc.wait(timeout=max(timeout, 1))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    rc = "timeout"
                    f.write(f"\n# killed after {timeout:.0f} s\n")
        with open(log, errors="replace") as f:
            return rc, f.read()

    def pack(self):
        with tarfile.open(os.path.join(self.out, "logs.tar.gz"), "w:gz") as tar:
            tar.add(self.work, arcname="gpu_check")
        self.summary["elapsed_s"] = round(time.monotonic() - self.start, 1)
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(self.summary, f, indent=1)

    def run(self):
        for step in self.args.steps:
            budget = BUDGETS[step] * self.args.budget_scale
            left = self.remaining()
            if left < min(30, budget):
                self.summary["steps"][step] = {"status": "skipped", "why": "past the deadline"}
                continue
            budget = min(budget, left)
            t0 = time.monotonic()
            try:
                result = getattr(self, f"step_{step}")(budget)
            except Exception as e:  # a bug in the driver must not lose the other steps
                result = {"status": "error", "why": f"{type(e).__name__}: {e}"}
            result.update(seconds=round(time.monotonic() - t0, 1), budget_s=round(budget))
            self.summary["steps"][step] = result
            self.pack()
        ok = all(s["status"] in ("passed", "rehearsed") for s in self.summary["steps"].values())
        self.summary["ok"] = ok
        screen = self.screen()
        with open(os.path.join(self.work, "summary.txt"), "w") as f:
            f.write(screen)
        shutil.copy(os.path.join(self.work, "summary.txt"), os.path.join(self.out, "summary.txt"))
        self.pack()
        print(screen)
        return 0 if ok else 1

    # ------------------------------------------------------------ steps
    def step_versions(self, budget):
        rc, text = self.sh("versions", [sys.executable, "-c", VERSIONS_SCRIPT], budget)
        line = next((l for l in text.splitlines() if l.startswith("VERSIONS ")), None)
        if rc != 0 or line is None:
            return {"status": "failed", "rc": rc}
        self.summary["versions"] = json.loads(line[len("VERSIONS "):])
        return {"status": "passed"}

    def step_build(self, budget):
        if self.args.rehearse:
            rc, _ = self.sh("build", [sys.executable, "-c", "import bnext._C"], budget)
            if rc == 0:
                return {"status": "rehearsed", "why": "bnext already built; no CUDA build here"}
        # One CPU level (the machine's own) is enough for CUDA checks and
        # saves three quarters of the CPU kernels' compile time.
        env = {"TORCH_CUDA_ARCH_LIST": self.args.arch, "MAX_JOBS": str(os.cpu_count() or 4),
               "BNEXT_CPU_LEVELS": "native"}
        rc, text = self.sh("build", [sys.executable, "setup.py", "build_ext", "--inplace",
                                     "--build-temp", os.path.join("build", "gpu_check")],
                           budget, env)
        if rc != 0:
            tail = [l for l in text.splitlines() if "error" in l.lower()][:5]
            return {"status": "timeout" if rc == "timeout" else "failed", "rc": rc, "errors": tail}
        rc, text = self.sh("build_registered", [sys.executable, "-c", REGISTERED_SCRIPT], 60)
        registered = "registered: True" in text
        if not registered and not self.args.rehearse:
            return {"status": "failed", "why": "bnext built but its CUDA kernels are not registered"}
        return {"status": "passed", "cuda_kernels_registered": registered}

    def _pytest(self, name, selection, timeout, extra=()):
        cmd = [sys.executable, "-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider",
               "-rfE", *extra, *selection]
        rc, text = self.sh(name, cmd, timeout)
        return rc, parse_pytest(text)

    def step_tests(self, budget):
        t0 = time.monotonic()
        # Several pytest processes share the GPU: the compile and graph tests
        # spend most of their time on the host.
        extra = []
        if not self.args.rehearse and _has_module("xdist"):
            extra = ["-n", str(min(8, os.cpu_count() or 1))]
        first = ["tests/test_gpu_cases.py", "tests/test_cuda_graphs.py", "-k", "cuda"]
        rc1, r1 = self._pytest("tests_first_contact", first, budget * 0.65, extra)
        rest = ["tests", "-k", "cuda", "--ignore=tests/test_gpu_cases.py",
                "--ignore=tests/test_cuda_graphs.py", "--ignore=tests/test_cuda_build.py"]
        left = budget - (time.monotonic() - t0)
        rc2, r2 = (self._pytest("tests_suite_cuda", rest, left, extra) if left > 20
                   else ("skipped", parse_pytest("")))
        counts = {k: r1["counts"].get(k, 0) + r2["counts"].get(k, 0)
                  for k in set(r1["counts"]) | set(r2["counts"])}
        result = {"first_contact": {"rc": rc1, **r1}, "suite_cuda": {"rc": rc2, **r2},
                  "counts": counts}
        bad = counts.get("FAILED", 0) + counts.get("ERROR", 0)
        if self.args.rehearse:
            # Nothing can run without a GPU; the selection must still collect.
            ran = sum(counts.values())
            result["status"] = "rehearsed" if ran and not bad and rc1 in (0, 5) else "failed"
        elif "timeout" in (rc1, rc2) or rc2 == "skipped":
            result["status"] = "failed" if bad else "timeout"
        else:
            result["status"] = "passed" if rc1 == 0 and rc2 == 0 and not bad else "failed"
        return result

    def step_sanitize(self, budget):
        subset = [sys.executable, "tests/cuda_sanitize_subset.py"]
        if self.args.rehearse or not shutil.which("compute-sanitizer"):
            rc, text = self.sh("sanitize_cases", subset + ["--list"], budget)
            cases = len([l for l in text.splitlines()[3:] if l.strip()])
            status = "rehearsed" if self.args.rehearse and rc == 0 else "unavailable"
            return {"status": status, "cases": cases, "why": "no compute-sanitizer or no GPU"}
        env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        tools = [("memcheck", [], 0.5), ("racecheck", ["--quick"], 0.3),
                 ("synccheck", ["--quick"], 0.2)]
        t0 = time.monotonic()
        result, status = {}, "passed"
        for tool, subset_opts, share in tools:
            left = budget - (time.monotonic() - t0)
            # API return codes (torch polls streams and events) are not kernel
            # errors; the summary then counts only what the kernels did.
            cmd = ["compute-sanitizer", "--tool", tool, "--report-api-errors", "no",
                   "--print-limit", "20", *subset, *subset_opts]
            rc, text = self.sh(f"sanitize_{tool}", cmd, min(left, budget * share + 10), env)
            r = parse_sanitizer(text)
            r["rc"] = rc
            r["cases_ok"] = len(re.findall(r"^ok ", text, re.M))
            result[tool] = r
            if rc == "timeout":
                status = "timeout" if status == "passed" else status
            elif rc != 0 or r["errors"] != 0 or r["cases_ok"] == 0:
                status = "failed"
        result["status"] = status
        return result

    def step_bench(self, budget):
        if self.args.rehearse:
            runs = [("bench", ["--device", "cpu", "--quick", "--no-compile", "--repeats", "1",
                               "--min-time", "0.001", "--dtypes", "fp32", "--shapes", "7x7"], 1.0)]
        else:
            cuda = ["--device", "cuda", "--batch", "256", "--shapes", "resnet50"]
            # Most important first: a run cut short keeps the main grid. Each
            # torch.compile case compiles anew, so that baseline gets two shapes.
            runs = [
                ("bench", cuda + ["--no-compile", "--dtypes", "fp16,bf16,fp32"], 0.6),
                ("bench_fused_add_relu", cuda + ["--no-compile", "--fused", "relu", "--residual",
                                                 "--dtypes", "fp16,bf16"], 0.15),
                ("bench_fused_relu", cuda + ["--no-compile", "--fused", "relu", "--dtypes", "bf16"], 0.1),
                ("bench_compile", cuda + ["--dtypes", "bf16", "--layouts", "channels_last",
                                          "--shapes", "256x56x56,1024x14x14"], 0.2),
            ]
        t0 = time.monotonic()
        result, status = {}, "passed"
        for name, opts, share in runs:
            left = budget - (time.monotonic() - t0)
            if left < 15:
                result[name] = {"status": "skipped"}
                continue
            case_budget = max(10, min(left, budget * share) - 15)
            out = os.path.join(self.work, f"{name}.json")
            rc, text = self.sh(name, [sys.executable, "-m", "benchmarks.bench", *opts, "--out", out,
                                      "--time-budget", f"{case_budget:.0f}"], left)
            r = {"rc": rc, "geomeans": [l for l in text.splitlines() if l.startswith("geomean")]}
            if os.path.exists(out):
                with open(out) as f:
                    data = json.load(f)
                r["cases"] = len(data["results"])
                r["truncated"] = data.get("truncated", False)
                if name == "bench":
                    shutil.copy(out, os.path.join(self.out, "bench.json"))
                    png = os.path.splitext(out)[0] + ".png"
                    if os.path.exists(png):
                        shutil.copy(png, os.path.join(self.out, "bench.png"))
            if rc != 0:
                status = "failed"
            result[name] = r
        result["status"] = "rehearsed" if self.args.rehearse and status == "passed" else status
        return result

    # ------------------------------------------------------------ report
    def screen(self):
        v = self.summary.get("versions", {})
        lines = [f"bnext gpu_check at {v.get('git_commit') or self.args.label}: {v.get('gpu', 'no GPU')}"
                 f" ({v.get('sm_count')} SMs, L2 {v.get('l2_bytes')} B), driver {v.get('driver')},"
                 f" torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), Python {v.get('python')}",
                 f"{'step':<9} {'status':<11} {'s/budget':>10}  details"]
        for step, r in self.summary["steps"].items():
            lines.append(f"{step:<9} {r['status']:<11} "
                         f"{str(r.get('seconds', '-')) + '/' + str(r.get('budget_s', '-')):>10}  "
                         f"{describe(step, r)}")
            if step == "tests":
                for t in (r["first_contact"]["failed"] + r["suite_cuda"]["failed"])[:8]:
                    lines.append(f"{'':>33}FAILED {t}")
            if step == "bench":
                for name, b in r.items():
                    if isinstance(b, dict):
                        lines += [f"{'':>33}{name}: {g}" for g in b.get("geomeans", [])[:9]]
        lines.append(f"total {time.monotonic() - self.start:.0f} s; "
                     f"{'ALL PASSED' if self.summary.get('ok') else 'NOT ALL PASSED'}")
        return "\n".join(lines) + "\n"


def describe(step, r):
    if "why" in r:
        return r["why"]
    if step == "tests":
        return ", ".join(f"{v} {k.lower()}" for k, v in sorted(r["counts"].items()))
    if step == "sanitize":
        return ", ".join(f"{t} {r[t]['errors']} errors ({r[t]['cases_ok']} cases, rc {r[t]['rc']})"
                         for t in ("memcheck", "racecheck", "synccheck") if t in r)
    if step == "bench":
        return ", ".join(f"{k}: {v.get('cases', 0)} cases" + (" (truncated)" if v.get("truncated") else "")
                         for k, v in r.items() if isinstance(v, dict))
    if step == "build":
        return f"CUDA kernels registered: {r.get('cuda_kernels_registered')}"
    return ""


_PYTEST_LINE = re.compile(r"(tests/\S+::\S+).*?\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
                          r"|\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b.*?(tests/\S+::\S+)")


def parse_pytest(text):
    """Per-outcome counts and failing test ids from `pytest -v` output (also
    from a run killed half-way, which writes no report)."""
    outcome = {}
    for line in text.splitlines():
        m = _PYTEST_LINE.search(line)
        if m:
            test = m.group(1) or m.group(4)
            outcome[test] = m.group(2) or m.group(3)
    counts = {}
    for o in outcome.values():
        counts[o] = counts.get(o, 0) + 1
    failed = [t for t, o in outcome.items() if o in ("FAILED", "ERROR")]
    return {"counts": counts, "failed": failed}


def parse_sanitizer(text):
    """Errors reported by compute-sanitizer: memcheck/synccheck print
    "ERROR SUMMARY: N errors", racecheck "RACECHECK SUMMARY: ... (N errors,
    M warnings)". None when no summary line was printed."""
    errors = None
    for m in re.finditer(r"ERROR SUMMARY: (\d+) error", text):
        errors = (errors or 0) + int(m.group(1))
    for m in re.finditer(r"RACECHECK SUMMARY: .*?\((\d+) errors?, (\d+) warnings?\)", text):
        errors = (errors or 0) + int(m.group(1)) + int(m.group(2))
    return {"errors": errors, "first": [l for l in text.splitlines() if "=========" in l][:20]}


def _has_module(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main(argv=None):
    p = argparse.ArgumentParser(description="bnext's first-contact GPU check (see module doc)")
    p.add_argument("--out", required=True, help="folder for summary.json, summary.txt, logs.tar.gz, bench.*")
    p.add_argument("--work", default=os.path.join(ROOT, "build", "gpu_check_out"),
                   help="folder for every log (packed into OUT/logs.tar.gz)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {','.join(STEPS)}")
    p.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST for the build")
    p.add_argument("--deadline", type=float, default=480.0,
                   help="seconds: no step starts after it, none runs past it")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every step's budget")
    p.add_argument("--rehearse", action="store_true", help="run without a GPU (see module doc)")
    p.add_argument("--label", default=None,
                   help="recorded in summary.json, e.g. the commit (the device copy has no .git)")
    args = p.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; choose from {STEPS}")
    return Driver(args).run()


if __name__ == "__main__":
    sys.exit(main())
