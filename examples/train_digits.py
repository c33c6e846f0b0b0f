"""The main job: train a small residual CNN on scikit-learn's handwritten
digits twice, once with torch.nn.BatchNorm2d and once with bnext, from the
same seed, and compare the runs epoch by epoch.

    python examples/train_digits.py [--epochs 8] [--batch-size 64]

Uses CUDA when it is available and bnext was built with CUDA kernels.
Exits with status 1 if either run ends below --min-accuracy on the test split.
"""

import argparse
import copy
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tqdm import tqdm

import bnext


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected) skip connection, then ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.skip(x))


class SmallResNet(nn.Module):
    def __init__(self, classes=10, width=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)  # 8x8 -> 4x4
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def load_data(device, seed, dtype):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=dtype).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return (x[train].to(device), y[train].to(device)), (x[test].to(device), y[test].to(device))


def evaluate(model, data):
    model.eval()
    with torch.no_grad():
        logits = model(data[0])
    model.train()
    return (logits.argmax(1) == data[1]).float().mean().item(), logits


def train_epoch(model, opt, train, batch_size, generator, progress):
    x, y = train
    order = torch.randperm(len(y), generator=generator).to(x.device)
    total_loss, correct = 0.0, 0
    start = time.perf_counter()
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        if len(idx) < 2:  # a batch of one has one value per channel
            continue
        logits = model(x[idx])
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == y[idx]).sum().item()
        progress.update(1)
    if x.is_cuda:
        torch.cuda.synchronize()
    return total_loss / len(y), correct / len(y), time.perf_counter() - start


def bnext_has_cuda():
    return torch._C._dispatch_has_kernel_for_dispatch_key("bnext::batch_norm_train", "CUDA")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-accuracy", type=float, default=0.95)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="float64 shows that the runs differ only by float32 rounding, "
                        "which SGD amplifies over the epochs")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and bnext_has_cuda() else "cpu")
    print(f"device: {device}  torch {torch.__version__}  bnext {bnext.__version__}  "
          f"threads: {torch.get_num_threads()}")
    dtype = getattr(torch, args.dtype)
    train, test = load_data(device, args.seed, dtype)
    print(f"digits: {len(train[1])} train / {len(test[1])} test images, 8x8")

    torch.manual_seed(args.seed)
    base = SmallResNet().to(device=device, dtype=dtype)
    runs = {"torch": copy.deepcopy(base), "bnext": bnext.convert_batchnorm(copy.deepcopy(base))}
    n_bn = sum(isinstance(m, bnext.BatchNorm2d) for m in runs["bnext"].modules())
    print(f"model: SmallResNet with {n_bn} BatchNorm2d layers "
          f"({sum(p.numel() for p in base.parameters())} parameters, {args.dtype})")
    opts = {k: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
            for k, m in runs.items()}
    gens = {k: torch.Generator().manual_seed(args.seed + 1) for k in runs}
    steps = (len(train[1]) + args.batch_size - 1) // args.batch_size

    header = (f"{'epoch':>5} | {'torch loss':>10} {'acc':>6} {'test':>6} {'s/epoch':>7} | "
              f"{'bnext loss':>10} {'acc':>6} {'test':>6} {'s/epoch':>7} | {'max |Δ logits|':>14}")
    rows = []
    with tqdm(total=args.epochs * steps * len(runs), desc="training", unit="step",
              file=sys.stderr, leave=False) as progress:
        for epoch in range(1, args.epochs + 1):
            row = {}
            for name, model in runs.items():
                loss, acc, secs = train_epoch(model, opts[name], train, args.batch_size, gens[name], progress)
                test_acc, logits = evaluate(model, test)
                row[name] = (loss, acc, test_acc, secs, logits)
            diff = (row["torch"][4] - row["bnext"][4]).abs().max().item()
            rows.append((epoch, row, diff))
            tqdm.write(f"epoch {epoch} done", file=sys.stderr)

    print(header)
    print("-" * len(header))
    for epoch, row, diff in rows:
        t, b = row["torch"], row["bnext"]
        print(f"{epoch:>5} | {t[0]:>10.4f} {t[1]:>6.3f} {t[2]:>6.3f} {t[3]:>7.3f} | "
              f"{b[0]:>10.4f} {b[1]:>6.3f} {b[2]:>6.3f} {b[3]:>7.3f} | {diff:>14.3e}")

    param_diff = max((a - b).abs().max().item()
                     for a, b in zip(runs["torch"].state_dict().values(), runs["bnext"].state_dict().values())
                     if a.is_floating_point())
    loss_diff = max(abs(r["torch"][0] - r["bnext"][0]) for _, r, _ in rows)
    logit_diff = max(d for _, _, d in rows)
    print(f"largest difference between the runs: train loss {loss_diff:.3e}, "
          f"test logits {logit_diff:.3e}, parameters/buffers {param_diff:.3e}")
    final = {k: rows[-1][1][k][2] for k in runs}
    print(f"final test accuracy: torch {final['torch']:.4f}, bnext {final['bnext']:.4f} "
          f"(required: {args.min_accuracy:.2f})")
    ok = all(v >= args.min_accuracy for v in final.values())
    if not ok:
        print("FAILED: test accuracy below the required minimum")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
