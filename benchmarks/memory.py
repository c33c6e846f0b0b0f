"""Activation memory kept for backward: a ResNet-style training step built
from torch's Conv2d + BatchNorm2d + activation, against the same network
converted by bnext (fused BatchNormAct, and fused with memory_saving).

    python -m benchmarks.memory                   # CPU: bytes saved for backward
    python -m benchmarks.memory --device cuda     # also max_memory_allocated

On CPU the measure is the bytes of the distinct storages autograd keeps for
backward (torch.autograd.graph.saved_tensors_hooks, one count per storage,
parameters listed separately). On CUDA the peak of
torch.cuda.max_memory_allocated over forward+backward is reported as well.
Results go to benchmarks/results/memory_<device>.json.
"""

import argparse
import copy
import json
import os

import torch
from torch import nn

import bnext
from benchmarks.bench import machine_info


class Block(nn.Module):
    """conv-BN-act, conv-BN, + shortcut, act (ResNet's BasicBlock)."""

    def __init__(self, cin, cout, stride, act):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = act()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = act()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + identity)


class ResNetStyle(nn.Module):
    def __init__(self, act, width=32, blocks=(2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  act())
        layers, c = [], width
        for i, n in enumerate(blocks):
            for j in range(n):
                out = width * 2 ** i
                layers.append(Block(c, out, 2 if (j == 0 and i > 0) else 1, act))
                c = out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


ACTS = {
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "leaky_relu_inplace": lambda: nn.LeakyReLU(0.01, inplace=True),
    "relu": nn.ReLU,
}


def saved_bytes(model, x):
    """(activation bytes, parameter bytes) of the distinct storages kept."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    act = sum(n for p, n in storages.items() if p not in params)
    par = sum(n for p, n in storages.items() if p in params)
    loss.backward()
    return act, par


def peak_cuda_bytes(model, x):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model(x).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def variants(act_name):
    torch.manual_seed(0)
    ref = ResNetStyle(ACTS[act_name])
    out = {f"torch (Conv, BatchNorm2d, {act_name})": ref,
           "bnext fused": bnext.convert_batchnorm(copy.deepcopy(ref), fuse_activations=True)}
    if act_name.startswith("leaky_relu"):
        out["bnext fused, memory_saving"] = bnext.convert_batchnorm(
            copy.deepcopy(ref), fuse_activations=True, memory_saving=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    rows = []
    for act_name in ACTS:
        base = None
        for name, model in variants(act_name).items():
            model = model.to(args.device).train()
            model(x).sum().backward()  # warm-up: lazy state, allocator
            act, par = saved_bytes(model, x)
            row = {"activation": act_name, "variant": name, "saved_activation_bytes": act,
                   "saved_parameter_bytes": par}
            if args.device == "cuda":
                row["peak_cuda_bytes"] = peak_cuda_bytes(model, x)
            base = base or row
            row["vs_torch"] = act / base["saved_activation_bytes"]
            rows.append(row)
    head = f"{'variant':<46} {'saved MB':>9} {'vs torch':>9}" + ("  peak MB" if args.device == "cuda" else "")
    print(f"ResNet-style net ({sum(1 for m in variants('relu')['bnext fused'].modules() if isinstance(m, nn.Conv2d))} convs), "
          f"input {tuple(x.shape)}, {args.device}")
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['variant']:<46} {r['saved_activation_bytes'] / 2**20:>9.2f} {r['vs_torch']:>8.2f}x"
        if "peak_cuda_bytes" in r:
            line += f" {r['peak_cuda_bytes'] / 2**20:>8.1f}"
        print(line)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"memory_{args.device}.json")
    with open(out, "w") as f:
        json.dump({"machine": machine_info(args.device), "args": vars(args), "results": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
