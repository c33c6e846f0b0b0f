"""Every bnext op once on CUDA, for compute-sanitizer (not a pytest file):

    compute-sanitizer --tool memcheck python tests/cuda_sanitize_subset.py

Covers both layouts, float16 (with float32 parameters) and float32, a packed
(16-byte) and an unpacked (odd sizes) shape, the (N, C) case, eval and
training backwards, residual, memory_saving and the cumulative running
average. Exits non-zero if an op raises; memcheck reports its own errors.
"""

import sys

import torch

import bnext  # noqa: F401  (registers the ops)

ops = torch.ops.bnext


def layouts(shape):
    yield "contiguous", lambda t: t.contiguous()
    if len(shape) == 4:
        yield "channels_last", lambda t: t.contiguous(memory_format=torch.channels_last)


def run_case(shape, dtype, fmt):
    C = shape[1]
    x = fmt(torch.randn(shape, device="cuda", dtype=dtype))
    dy = fmt(torch.randn(shape, device="cuda", dtype=dtype))
    res = fmt(torch.randn(shape, device="cuda", dtype=dtype))
    w = torch.rand(C, device="cuda") + 0.5
    b = torch.randn(C, device="cuda")
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    nbt = torch.ones((), device="cuda", dtype=torch.long)

    out, mean, invstd, uvar = ops.batch_norm_train(x, w, b, 1e-5)
    ops.update_running_stats(rm, rv, mean, uvar, 0.1, None)
    ops.update_running_stats(rm, rv, mean, uvar, None, nbt)
    ops.batch_norm_eval(x, rm, rv, w, b, 1e-5)
    ops.batch_norm_train(x, None, None, 1e-5)
    for train in (True, False):
        ops.batch_norm_backward(dy, x, w, rm, rv, mean, invstd, train, 1e-5, [True, True, True])
    ops.batch_norm_backward(dy, x, None, rm, rv, mean, invstd, True, 1e-5, [True, False, False])

    for act, slope in (("relu", 0.0), ("silu", 0.0), ("elu", 1.0), ("leaky_relu", 0.1)):
        y, mean, invstd, _ = ops.batch_norm_act_train(x, w, b, res, 1e-5, act, slope, False)
        ops.batch_norm_act_eval(x, rm, rv, w, b, res, 1e-5, act, slope, False)
        for train in (True, False):
            ops.batch_norm_act_backward(dy, x, False, w, b, res, rm, rv, mean, invstd, train,
                                        1e-5, act, slope, [True, True, True, True])
        if act in ("elu", "leaky_relu"):
            y, mean, invstd, _ = ops.batch_norm_act_train(x, w, b, None, 1e-5, act, slope, True)
            ops.batch_norm_act_backward(dy, y, True, w, b, None, rm, rv, mean, invstd, True,
                                        1e-5, act, slope, [True, False, True, True])


def main():
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    for shape in ((4, 8, 7, 7), (3, 6, 5, 5), (4, 16, 8, 8), (33, 12)):
        for dtype in (torch.float16, torch.float32):
            for name, fmt in layouts(shape):
                run_case(shape, dtype, fmt)
                print(f"ok {shape} {dtype} {name}")
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
