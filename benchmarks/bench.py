"""Benchmark bnext's batch norm against torch's, eager and compiled.

    python -m benchmarks.bench                      # CPU, batch 32, fp32 + bf16
    python -m benchmarks.bench --quick              # a fast smoke run
    python -m benchmarks.bench --device cuda        # batch 256
    python -m benchmarks.bench --fused relu         # BN+ReLU: bnext.BatchNormAct2d
                                                    # vs BatchNorm2d followed by ReLU
    python -m benchmarks.bench --fused relu --residual   # BN+add+ReLU

For each shape, layout (NCHW, channels_last), dtype and mode (training
forward, forward+backward, eval) the implementations run interleaved in one
process: a plain copy of the tensor (x.clone(): allocate, read, write),
torch.nn.BatchNorm* eager, the same
module under torch.compile, and bnext. Each repeat times every implementation
once with torch.utils.benchmark; the table reports medians over repeats, the
speedup over torch, time in "copies" (time / time of the plain copy) and the
effective bandwidth over the minimum bytes a streaming kernel must move
(training forward 3S, forward+backward 3S + 5S, eval 2S, S = tensor bytes;
a residual adds S to each forward and 2S to forward+backward), and
"copy_fraction": the time of a copy moving those bytes over the time taken,
i.e. the fraction of copy bandwidth reached at the op's pass count.

On CUDA each call is timed alone between two CUDA events after an L2 flush
(median over repeats, implementations interleaved), and every row records
which backend torch's own batch norm used for it (cuDNN or native).

Writes a JSON file (machine, versions, every row) and a PNG plot.

Allocator: with glibc's defaults every allocation above 32 MiB is a fresh
mmap, and its page faults cost ~10x the copy itself (51 MB: 14 ms of faults
vs 1.5 ms of copying), for torch and bnext alike, drowning the kernels. By
default the harness therefore re-executes itself with MALLOC_MMAP_MAX_=0 and
a huge MALLOC_TRIM_THRESHOLD_, so freed memory is reused as it is with
jemalloc/tcmalloc or a long-running training loop. --malloc default measures
plain glibc instead. The JSON records which.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.utils.benchmark as tbench
from tqdm import tqdm

import bnext
from benchmarks.shapes import shape_set

MODES = ("fwd", "fwdbwd", "eval")
# Minimum bytes a streaming implementation moves, in units of the tensor size.
PASSES = {"fwd": 3, "fwdbwd": 8, "eval": 2}
# What a residual adds: read it in the forward, write its gradient in the backward.
RESIDUAL_PASSES = {"fwd": 1, "fwdbwd": 2, "eval": 1}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def machine_info(device):
    info = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bnext": bnext.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    return info


def _module_classes(ndim):
    if ndim <= 3:
        return torch.nn.BatchNorm1d, bnext.BatchNorm1d
    return (torch.nn.BatchNorm2d, bnext.BatchNorm2d) if ndim == 4 else (torch.nn.BatchNorm3d, bnext.BatchNorm3d)


def make_input(shape, layout, dtype, device):
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


ACTIVATIONS = {"relu": torch.nn.ReLU, "leaky_relu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
               "silu": torch.nn.SiLU, "gelu": torch.nn.GELU}


class BNAct(torch.nn.Module):
    """torch's unfused pair: BatchNorm followed by an activation module
    (with a residual: BatchNorm, add, activation)."""

    def __init__(self, bn, act):
        super().__init__()
        self.bn = bn
        self.act = act

    def forward(self, x, residual=None):
        y = self.bn(x)
        return self.act(y if residual is None else y + residual)


def _bnext_fused(ref):
    """The BatchNormAct that bnext's converter makes of torch's BN + act."""
    seq = bnext.convert_batchnorm(torch.nn.Sequential(copy.deepcopy(ref.bn), copy.deepcopy(ref.act)),
                                  fuse_activations=True)
    return seq[0]


def build_impls(shape, layout, dtype, mode, device, with_compile, fused=None, residual=False):
    """name -> zero-argument callable for one (shape, layout, dtype, mode).

    fused: an activation name; torch runs BN then that activation, bnext the
    fused BatchNormAct its converter makes of the pair. residual: both also
    add a residual tensor before the activation.
    """
    torch_cls, _ = _module_classes(len(shape))
    C = shape[1]
    # Parameters in float32 for half inputs: the mixed-precision (AMP) setup.
    pdtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    ref = torch_cls(C, device=device, dtype=pdtype)
    if fused:
        ref = BNAct(ref, ACTIVATIONS[fused]())
    models = {"torch": ref,
              "bnext": _bnext_fused(ref) if fused else bnext.convert_batchnorm(copy.deepcopy(ref))}
    if with_compile:
        # A fresh dynamo cache per case: every case is a new module of the
        # same class, so without a reset the 9th case would exceed dynamo's
        # recompile limit and silently run eager.
        torch._dynamo.reset()
        models["torch.compile"] = torch.compile(copy.deepcopy(ref))
    x = make_input(shape, layout, dtype, device)
    dy = make_input(shape, layout, dtype, device)
    extra = (make_input(shape, layout, dtype, device),) if residual else ()
    # The copy baseline allocates its output like every BN implementation
    # does: above glibc's mmap threshold (32 MiB) a fresh allocation costs
    # page faults that dwarf the copy itself, for torch and bnext alike.
    impls = {"copy": lambda: x.clone()}
    for name, m in models.items():
        if mode == "eval":
            m.eval()

            def run(m=m):
                with torch.no_grad():
                    return m(x, *extra)
        elif mode == "fwd":
            def run(m=m):
                return m(x, *extra)
        else:
            xg = x.detach().requires_grad_(True)
            rg = tuple(r.detach().requires_grad_(True) for r in extra)
            params = [xg, *rg] + [p for p in m.parameters()]

            def run(m=m, xg=xg, rg=rg, params=params):
                return torch.autograd.grad(m(xg, *rg), params, dy)
        impls[name] = run
    return impls, x


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# Bigger than the L2 of any current GPU (H100 50 MB, H200 60 MB): zeroing it
# between timed calls evicts the previous call's data, so every call reads
# its inputs from HBM as it would inside a network.
L2_FLUSH_BYTES = 256 * 2**20


def time_case_cuda(impls, repeats):
    """Median seconds per call on CUDA: each call between two CUDA events,
    after an L2 flush, implementations interleaved within every repeat."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for fn in impls.values():  # warm-up (and compilation)
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    events = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3
            for name, pairs in events.items()}


def torch_backend(shape, layout, dtype, mode, device):
    """Which kernels torch's own batch norm runs for this case on `device`:
    'cudnn' or 'native' (torch's own selection rule, asked directly)."""
    x = make_input(shape, layout, dtype, device)
    pdtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    C = shape[1]
    w = torch.ones(C, device=device, dtype=pdtype)
    b, rm, rv = torch.zeros_like(w), torch.zeros_like(w), torch.ones_like(w)
    backend = torch._C._select_batch_norm_backend(x, w, b, rm, rv, mode != "eval", 1e-5)
    return str(backend).rsplit(".", 1)[-1].lower()


def time_case(impls, repeats, min_time, device):
    """Median seconds per call for every implementation, interleaved."""
    if device == "cuda":
        return time_case_cuda(impls, max(repeats, 25))
    for fn in impls.values():  # warm-up (and compilation)
        for _ in range(3):
            fn()
    _sync(device)
    timers, numbers = {}, {}
    for name, fn in impls.items():
        timers[name] = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        once = timers[name].timeit(1).median
        numbers[name] = max(1, int(min_time / max(once, 1e-7)))
    samples = {name: [] for name in impls}
    for _ in range(repeats):
        for name in impls:
            samples[name].append(timers[name].timeit(numbers[name]).median)
    return {name: statistics.median(v) for name, v in samples.items()}


def run(args):
    device = args.device
    batch = args.batch or (32 if device == "cpu" else 256)
    shapes = shape_set(batch)
    if args.quick:
        shapes = [shapes[i] for i in (1, 10, 12, 13, 14)]
    if args.shapes:
        shapes = [s for s in shapes if any(k in s[0] for k in args.shapes.split(","))]
    cases = []
    for name, shape in shapes:
        for layout in args.layouts.split(","):
            if layout == "channels_last" and len(shape) < 4:
                continue
            for dt in args.dtypes.split(","):
                for mode in args.modes.split(","):
                    cases.append((name, shape, layout, dt, mode))

    rows = []
    start = time.monotonic()
    for name, shape, layout, dt, mode in tqdm(cases, desc="benchmark", unit="case", file=sys.stderr):
        if args.time_budget and time.monotonic() - start > args.time_budget:
            args.truncated = True
            print(f"time budget of {args.time_budget:.0f} s spent: {len(cases) - len(rows)} "
                  "cases not run", file=sys.stderr)
            break
        impls, x = build_impls(shape, layout, DTYPES[dt], mode, device, not args.no_compile,
                               args.fused, args.residual)
        t = time_case(impls, args.repeats, args.min_time, device)
        nbytes = x.numel() * x.element_size()
        passes = PASSES[mode] + (RESIDUAL_PASSES[mode] if args.residual else 0)
        row = {"case": name, "shape": list(shape), "layout": layout, "dtype": dt, "mode": mode,
               "bytes": nbytes, "ms": {k: v * 1e3 for k, v in t.items()}}
        row["speedup_vs_torch"] = t["torch"] / t["bnext"]
        if "torch.compile" in t:
            row["speedup_vs_compile"] = t["torch.compile"] / t["bnext"]
        row["copies"] = {k: v / t["copy"] for k, v in t.items() if k != "copy"}
        row["copy_GBps"] = 2 * nbytes / t["copy"] / 1e9
        row["passes"] = passes
        row["copy_fraction"] = {k: passes / 2 * t["copy"] / v for k, v in t.items() if k != "copy"}
        row["bnext_effective_GBps"] = passes * nbytes / t["bnext"] / 1e9
        if device == "cuda":
            row["torch_backend"] = torch_backend(shape, layout, DTYPES[dt], mode, device)
        rows.append(row)
        del impls, x
    return rows


def geomean(values):
    values = list(values)
    return float(torch.tensor(values, dtype=torch.float64).log().mean().exp()) if values else float("nan")


def print_table(rows, out=sys.stdout):
    has_compile = any("torch.compile" in r["ms"] for r in rows)
    head = (f"{'case':<24} {'layout':<13} {'dtype':<5} {'mode':<7} {'copy ms':>8} {'torch ms':>9} "
            + (f"{'compile ms':>10} " if has_compile else "")
            + f"{'bnext ms':>9} {'vs torch':>8} " + (f"{'vs comp':>8} " if has_compile else "")
            + f"{'copies':>7} {'torch cp':>8} {'GB/s':>6} {'copy bw':>7}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        ms = r["ms"]
        print(f"{r['case']:<24} {r['layout']:<13} {r['dtype']:<5} {r['mode']:<7} {ms['copy']:>8.3f} "
              f"{ms['torch']:>9.3f} " + (f"{ms['torch.compile']:>10.3f} " if has_compile else "")
              + f"{ms['bnext']:>9.3f} {r['speedup_vs_torch']:>7.2f}x "
              + (f"{r['speedup_vs_compile']:>7.2f}x " if has_compile else "")
              + f"{r['copies']['bnext']:>7.2f} {r['copies']['torch']:>8.2f} {r['bnext_effective_GBps']:>6.1f}"
              + f" {r['copy_fraction']['bnext']:>6.0%}",
              file=out)
    print(file=out)
    for dt in sorted({r["dtype"] for r in rows}):
        for mode in MODES:
            sel = [r for r in rows if r["dtype"] == dt and r["mode"] == mode]
            if not sel:
                continue
            line = (f"geomean {dt} {mode:<7}: {geomean(r['speedup_vs_torch'] for r in sel):.2f}x vs torch, "
                    f"slowest {min(r['speedup_vs_torch'] for r in sel):.2f}x")
            if has_compile:
                line += f", {geomean(r['speedup_vs_compile'] for r in sel):.2f}x vs torch.compile"
            print(line, file=out)


def plot(rows, path, info):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(len(dtypes), len(MODES), figsize=(6 * len(MODES), 4.5 * len(dtypes)),
                             squeeze=False)
    for i, dt in enumerate(dtypes):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            sel = [r for r in rows if r["dtype"] == dt and r["mode"] == mode]
            cases = list(dict.fromkeys(r["case"] for r in sel))
            for k, layout in enumerate(("contiguous", "channels_last")):
                pts = {r["case"]: r for r in sel if r["layout"] == layout}
                xs = [n + (k - 0.5) * 0.38 for n, c in enumerate(cases) if c in pts]
                ax.bar(xs, [pts[c]["speedup_vs_torch"] for c in cases if c in pts], width=0.38,
                       label=f"bnext vs torch, {layout}")
                xs_c = [n + (k - 0.5) * 0.38 for n, c in enumerate(cases) if c in pts and "speedup_vs_compile" in pts[c]]
                ax.plot(xs_c, [pts[c]["speedup_vs_compile"] for c in cases if c in pts and "speedup_vs_compile" in pts[c]],
                        "k.", label=f"bnext vs torch.compile" if k == 0 else None)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([c.replace("resnet50 ", "") for c in cases], rotation=70, fontsize=7)
            ax.set_yscale("log")
            ax.set_title(f"{dt} {mode}")
            ax.set_ylabel("speedup (x)")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    what = (f"BN+{'add+' if info.get('residual') else ''}{info['fused']} (fused)"
            if info.get("fused") else "batch norm")
    fig.suptitle(f"bnext vs torch {what}: {info.get('gpu') or info.get('cpu')}, "
                 f"{info['threads']} threads, torch {info['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CACHED_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def _reexec_with_cached_malloc(argv):
    """glibc reads these variables at start-up only, hence a fresh process."""
    if all(os.environ.get(k) == v for k, v in CACHED_MALLOC_ENV.items()):
        return
    env = dict(os.environ, **CACHED_MALLOC_ENV)
    args = list(sys.argv[1:] if argv is None else argv)
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench", *args], env)


def main(argv=None):
    p = argparse.ArgumentParser(description="bnext vs torch batch-norm benchmark")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 256 on CUDA")
    p.add_argument("--dtypes", default=None, help="default: fp32,bf16 on CPU, fp16,bf16,fp32 on CUDA")
    p.add_argument("--layouts", default="contiguous,channels_last")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--shapes", default="", help="comma-separated substrings of case names to keep")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.05, help="seconds per timed sample")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--fused", default=None, choices=sorted(ACTIVATIONS),
                   help="benchmark BN + this activation (bnext.BatchNormAct vs torch's pair)")
    p.add_argument("--residual", action="store_true",
                   help="with --fused: add a residual before the activation (BN+add+act)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds: start no case after this (0: no limit); the JSON says if truncated")
    p.add_argument("--quick", action="store_true", help="5 shapes only")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
    p.add_argument("--malloc", choices=["cached", "default"], default="cached",
                   help="cached: glibc set to reuse freed memory (see module doc)")
    args = p.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = "fp32,bf16" if args.device == "cpu" else "fp16,bf16,fp32"
    if args.residual and not args.fused:
        p.error("--residual needs --fused ACT")
    args.truncated = False
    if args.malloc == "cached":
        _reexec_with_cached_malloc(argv)

    info = machine_info(args.device)
    info["fused"] = args.fused
    info["residual"] = args.residual
    info["malloc"] = (" ".join(f"{k}={v}" for k, v in CACHED_MALLOC_ENV.items())
                      if args.malloc == "cached" else "glibc defaults")
    rows = run(args)
    print_table(rows)
    stem = args.device + (f"_fused_{'add_' if args.residual else ''}{args.fused}" if args.fused else "")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{stem}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": info, "args": vars(args), "truncated": args.truncated,
                   "results": rows}, f, indent=1)
    png = args.plot or os.path.splitext(out)[0] + ".png"
    plot(rows, png, info)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
