"""Cost of synchronising batch norm across gloo ranks on CPU.

    python -m benchmarks.sync_bench                 # 2 and 4 ranks
    python -m benchmarks.sync_bench --world 2 --repeats 5

Each rank holds its shard of the batch and times, interleaved in the same
process, a training forward+backward of bnext.SyncBatchNorm (statistics over
all ranks: one all_gather forward, one all_reduce backward) and of a local
bnext.BatchNorm2d on the same shard, and the two collectives alone (the
all_gather of the (3, C) float64 moments and the all_reduce of the (2, C)
sums, the payloads SyncBatchNorm exchanges). Every rank runs the same fixed number
of iterations (collectives must stay in lockstep); torch.utils.benchmark's
Timer.timeit gives each repeat, the table reports medians over repeats.
One thread per rank; glibc malloc set to reuse freed memory as in
benchmarks.bench. Writes benchmarks/results/sync_cpu.json.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.utils.benchmark as tbench

import bnext
from benchmarks.bench import CACHED_MALLOC_ENV, machine_info

# (per-rank batch, C, H, W): ResNet-50 layers at local batch 16, and one tiny one.
SHAPES = [(16, 64, 56, 56), (16, 256, 28, 28), (16, 512, 14, 14), (16, 2048, 7, 7), (16, 64, 8, 8)]


def _rank_main(rank, world, init_file, repeats, number, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    rows = []
    try:
        for shape in SHAPES:
            x = torch.randn(shape, requires_grad=True)
            dy = torch.randn(shape)
            sync, local = bnext.SyncBatchNorm(shape[1]), bnext.BatchNorm2d(shape[1])
            # The two collectives alone, on the same (3, C) and (2, C) payloads.
            stats = torch.zeros(3, shape[1], dtype=torch.float64)
            gathered = torch.empty(world * 3, shape[1], dtype=torch.float64)
            sums = torch.zeros(2, shape[1], dtype=torch.float64)
            comm = "dist.all_gather_into_tensor(gathered, stats); dist.all_reduce(sums)"
            cases = {
                "sync": ("m(x).backward(dy)", {"m": sync, "x": x, "dy": dy}),
                "local": ("m(x).backward(dy)", {"m": local, "x": x, "dy": dy}),
                "comm": (comm, {"dist": dist, "gathered": gathered, "stats": stats, "sums": sums}),
            }
            times = {name: [] for name in cases}
            for _ in range(repeats):
                for name, (stmt, env) in cases.items():
                    dist.barrier()
                    times[name].append(tbench.Timer(stmt, globals=env).timeit(number).mean)
            # A step is as slow as the slowest rank: report the max over ranks.
            med = torch.tensor([statistics.median(times[n]) for n in cases], dtype=torch.float64)
            dist.all_reduce(med, op=dist.ReduceOp.MAX)
            row = {"world": world, "shape_per_rank": list(shape)}
            row.update({f"{n}_ms": v * 1e3 for n, v in zip(cases, med.tolist())})
            rows.append(row)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--number", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/sync_cpu.json")
    args = p.parse_args()
    # Same allocator setting as benchmarks.bench (see its docstring); the
    # spawned ranks inherit it.
    os.environ.update(CACHED_MALLOC_ENV)
    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.world:
            out = os.path.join(tmp, f"{world}.json")
            mp.spawn(_rank_main, args=(world, os.path.join(tmp, f"init{world}"), args.repeats,
                                       args.number, out), nprocs=world)
            with open(out) as f:
                all_rows += json.load(f)
    info = machine_info("cpu")
    info.update(threads=1, cores=os.cpu_count(), backend="gloo",
                malloc=" ".join(f"{k}={v}" for k, v in CACHED_MALLOC_ENV.items()))
    with open(args.out, "w") as f:
        json.dump({"machine": info, "rows": all_rows}, f, indent=1)
    print(f"| ranks | shape per rank | local BN ms | SyncBatchNorm ms | sync / local "
          f"| collectives alone ms | (sync - collectives) / local |\n|---|---|---|---|---|---|---|")
    for r in all_rows:
        print(f"| {r['world']} | {tuple(r['shape_per_rank'])} | {r['local_ms']:.3f} | "
              f"{r['sync_ms']:.3f} | {r['sync_ms'] / r['local_ms']:.2f}x | {r['comm_ms']:.3f} | "
              f"{(r['sync_ms'] - r['comm_ms']) / r['local_ms']:.2f}x |")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, 1 thread per rank")


if __name__ == "__main__":
    main()
