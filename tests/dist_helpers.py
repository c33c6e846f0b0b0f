"""Run a function on several gloo ranks, spawned, bounded by a timeout."""

import datetime
import os
import sys
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, fn, world, init_file, args, backend):
    if backend == "nccl":
        import torch

        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Success: leave without interpreter teardown. After torch.compile, a
    # rank's teardown occasionally aborted ("terminate called without an
    # active exception": a worker thread still joinable at exit; ~1 run in 6
    # here), failing a test whose checks had all passed. Failures above
    # still raise normally and reach the parent with their traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world, tmp_path, *args, timeout=180, backend="gloo"):
    """Run ``fn(rank, world, *args)`` on ``world`` ranks (gloo, or nccl with
    one GPU per rank); a failure on any rank fails the test with that rank's
    traceback."""
    ctx = mp.start_processes(_entry, args=(fn, world, str(tmp_path / "init"), args, backend),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-rank run timed out after {timeout} s")
