"""Every bnext op on CUDA, once per case, for compute-sanitizer (not a pytest
file). benchmarks/gpu_check.py runs it under memcheck, racecheck and
synccheck:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python tests/cuda_sanitize_subset.py

Without PYTORCH_NO_CUDA_MEMORY_CACHING=1 every tensor lies inside a larger
block of torch's caching allocator, and memcheck cannot see an access past a
tensor's end.

The cases cover what a small shape never reaches: statistics and backward
sums split over many blocks per channel (N*H*W = 2**18 here, with 1, 3 and
64 channels), channel counts that are not a multiple of the pack width,
inputs whose storage offset breaks 16-byte alignment (scalar paths), an
empty batch, the (N, C) and 5-D cases; float16 and bfloat16 (with float32
and with their own parameters), float32 and float64; both layouts; eval,
training and both backwards, residual, every activation, memory_saving and
the cumulative running average. Exits non-zero if an op raises; the
sanitizer reports its own errors ("ERROR SUMMARY").

    python tests/cuda_sanitize_subset.py --list    # the cases, no GPU needed
    python tests/cuda_sanitize_subset.py --quick   # the first case of each group
"""

import argparse
import sys

import torch

DTYPES = {
    "f16": (torch.float16, torch.float32),
    "bf16": (torch.bfloat16, torch.float32),
    "bf16-bf16params": (torch.bfloat16, torch.bfloat16),
    "f32": (torch.float32, torch.float32),
    "f64": (torch.float64, torch.float64),
}

# (name, shape, layout, dtypes): layout "offset-*" starts one element into
# its storage. Multi-block cases come first: they are the point.
CASES = [
    ("multiblock-C1-nchw", (16, 1, 128, 128), "contiguous", ("bf16", "f32", "f64")),
    ("multiblock-C3-nhwc", (16, 3, 128, 128), "channels_last", ("bf16", "f16", "f32")),
    ("multiblock-C64-nchw", (4, 64, 256, 256), "contiguous", ("bf16", "f32")),
    ("multiblock-C64-nhwc", (4, 64, 256, 256), "channels_last", ("bf16", "f32")),
    ("multiblock-NC", (2**18, 3), "contiguous", ("f16", "f32")),
    ("offset-nchw", (4, 8, 16, 16), "offset-contiguous", ("bf16", "f16", "f32")),
    ("offset-nhwc", (4, 24, 6, 6), "offset-channels_last", ("bf16", "f32")),
    ("C13-nhwc", (8, 13, 9, 9), "channels_last", ("bf16-bf16params", "f64")),
    ("C13-nchw-odd-planes", (8, 13, 9, 9), "contiguous", ("f16", "f32")),
    ("packed-nchw", (4, 16, 8, 8), "contiguous", ("f16", "f32")),
    ("5-D", (2, 12, 3, 5, 6), "channels_last", ("bf16", "f32")),
    ("NC", (33, 12), "contiguous", ("f32",)),
    ("empty", (0, 6, 5, 5), "contiguous", ("f32", "bf16")),
]

ACTIVATIONS = (("relu", 0.0), ("silu", 0.0), ("gelu", 0.0), ("gelu_tanh", 0.0), ("elu", 1.0),
               ("leaky_relu", 0.1))


def make(shape, layout, dtype):
    offset = layout.startswith("offset-")
    layout = layout.removeprefix("offset-")
    numel = 1
    for s in shape:
        numel *= s
    flat = (torch.randn(numel + offset, device="cuda") * 2 + 0.5).to(dtype)
    if layout == "channels_last" and len(shape) >= 4:
        perm = (0, *range(2, len(shape)), 1)
        x = flat[offset:].view([shape[i] for i in perm])
        return x.permute(0, len(shape) - 1, *range(1, len(shape) - 1))
    return flat[offset:].view(shape)


def run_case(shape, layout, dtype, pdtype):
    ops = torch.ops.bnext
    C = shape[1]
    x = make(shape, layout, dtype)
    dy = make(shape, layout, dtype)
    res = make(shape, layout, dtype)
    w = (torch.rand(C, device="cuda") + 0.5).to(pdtype)
    b = torch.randn(C, device="cuda").to(pdtype)
    rm = torch.zeros(C, device="cuda", dtype=pdtype)
    rv = torch.ones(C, device="cuda", dtype=pdtype)
    nbt = torch.ones((), device="cuda", dtype=torch.long)

    out, mean, invstd, uvar = ops.batch_norm_train(x, w, b, 1e-5)
    ops.update_running_stats(rm, rv, mean, uvar, 0.1, None)
    ops.update_running_stats(rm, rv, mean, uvar, None, nbt)
    ops.batch_norm_eval(x, rm, rv, w, b, 1e-5)
    ops.batch_norm_train(x, None, None, 1e-5)
    for train in (True, False):
        ops.batch_norm_backward(dy, x, w, rm, rv, mean, invstd, train, 1e-5, [True, True, True])
    ops.batch_norm_backward(dy, x, None, rm, rv, mean, invstd, True, 1e-5, [True, False, False])
    ops.batch_norm_backward(dy, x, w, rm, rv, mean, invstd, True, 1e-5, [False, True, True])

    for act, slope in ACTIVATIONS:
        y, mean, invstd, _ = ops.batch_norm_act_train(x, w, b, res, 1e-5, act, slope, False)
        ops.batch_norm_act_eval(x, rm, rv, w, b, res, 1e-5, act, slope, False)
        for train in (True, False):
            ops.batch_norm_act_backward(dy, x, False, w, b, res, rm, rv, mean, invstd, train,
                                        1e-5, act, slope, [True, True, True, True])
        if act in ("elu", "leaky_relu"):
            for r in (None, res):
                y, mean, invstd, _ = ops.batch_norm_act_train(x, w, b, r, 1e-5, act, slope, True)
                ops.batch_norm_act_backward(dy, y, True, w, b, r, rm, rv, mean, invstd, True,
                                            1e-5, act, slope, [True, r is not None, True, True])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--quick", action="store_true", help="one dtype per case")
    args = p.parse_args(argv)
    runs = [(name, shape, layout, d) for name, shape, layout, dts in CASES
            for d in (dts[:1] if args.quick else dts)]
    if args.list:
        for name, shape, layout, d in runs:
            print(f"{name} {shape} {layout} {d}")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    import bnext  # noqa: F401  (registers the ops)

    torch.manual_seed(0)
    for name, shape, layout, d in runs:
        run_case(shape, layout, *DTYPES[d])
        torch.cuda.synchronize()
        print(f"ok {name} {d}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
