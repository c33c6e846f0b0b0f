"""Fixed cost of a batch-norm module call on tiny inputs, bnext against torch.

    python -m benchmarks.call_cost            # writes benchmarks/results/call_cost_cpu.json

On inputs this small (2x8x4x4, 64x32 float32, one thread) the kernels take a
microsecond or two and a call costs what its Python, dispatch and autograd
steps cost. For each shape, the module calls of torch.nn.BatchNorm and
bnext.BatchNorm (training forward, forward+backward, eval) are timed
interleaved in one process with torch.utils.benchmark, several rounds, and
the table gives the median per call and the ratio bnext / torch (below 1:
bnext is cheaper). It also counts the operator calls of one training forward
with torch.profiler: those made from Python (top level) and all of them
(including the ones an op makes inside).
"""

import argparse
import json
import os
import statistics

import torch
import torch.utils.benchmark as tbench

import bnext
from benchmarks.bench import machine_info

SHAPES = [(2, 8, 4, 4), (64, 32)]
MODES = {
    "train forward": "m(x)",
    "train forward+backward": "m(xg).sum().backward()",
    "eval": "e(x)",
}


def _module(lib, shape):
    cls = {2: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)]
    return getattr(lib.nn if lib is torch else lib, cls)(shape[1])


def _op_calls(m, x):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        m(x)
    events = [e for e in prof.events() if "::" in e.name]
    top = [e for e in events if e.cpu_parent is None]
    return {"top_level": [e.name for e in top], "all": len(events)}


def measure(shape, rounds, number):
    x = torch.randn(shape)
    xg = x.clone().requires_grad_()
    times = {}
    for _ in range(rounds):
        for lib in (torch, bnext):
            m = _module(lib, shape)
            e = _module(lib, shape).eval()
            for mode, stmt in MODES.items():
                t = tbench.Timer(stmt, globals={"m": m, "e": e, "x": x, "xg": xg})
                times.setdefault((lib.__name__, mode), []).append(t.timeit(number).mean)
    row = {"shape": list(shape)}
    for mode in MODES:
        ours = statistics.median(times[("bnext", mode)])
        theirs = statistics.median(times[("torch", mode)])
        row[mode] = {"torch_us": theirs * 1e6, "bnext_us": ours * 1e6, "ratio": ours / theirs}
    row["op_calls_train_forward"] = {
        "torch": _op_calls(_module(torch, shape), x),
        "bnext": _op_calls(_module(bnext, shape), x),
    }
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--number", type=int, default=2000)
    p.add_argument("--out", default="benchmarks/results/call_cost_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [measure(s, args.rounds, args.number) for s in SHAPES]
    info = machine_info("cpu")
    info.update(threads=1, cores=os.cpu_count())
    with open(args.out, "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    print("| shape | mode | torch us | bnext us | bnext / torch |\n|---|---|---|---|---|")
    for r in rows:
        for mode in MODES:
            v = r[mode]
            print(f"| {tuple(r['shape'])} | {mode} | {v['torch_us']:.1f} | {v['bnext_us']:.1f} | "
                  f"{v['ratio']:.2f}x |")
    for r in rows:
        for lib, c in r["op_calls_train_forward"].items():
            print(f"{tuple(r['shape'])} {lib}: {len(c['top_level'])} op calls from Python "
                  f"({', '.join(c['top_level'])}), {c['all']} in all")


if __name__ == "__main__":
    main()
