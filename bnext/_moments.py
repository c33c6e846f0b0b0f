"""Per-channel (count, mean, M2) of batch-norm inputs, and their exact merge.

Shared by SyncBatchNorm (across ranks) and recalibrate_batchnorm (across
batches and ranks). Merging is count-weighted (Chan, Golub & LeVeque's
parallel variance), in float64, never E[x^2] - E[x]^2.
"""

import torch

from ._ops import ops


def local_moments(x):
    """(3, C) float64: count, mean and M2 of each channel of an (N, C, *) ``x``."""
    C = x.shape[1]
    n = x.numel() // C if C else 0
    out = torch.zeros(3, C, dtype=torch.float64, device=x.device)
    out[0] = n
    if n == 1:  # one value per channel: it is the mean, with no spread
        out[1] = x.reshape(C)
    elif n > 1:
        # bnext's training kernel gives the mean (float64) and the unbiased
        # variance; the eps argument does not affect them.
        _, mean, _, unbiased_var = ops.batch_norm_train(x, None, None, 1.0)
        out[1] = mean
        out[2] = unbiased_var.to(torch.float64) * (n - 1)
    return out


def merge(moments):
    """Merge a (K, 3, C) stack of moments into one (3, C)."""
    counts, means, m2s = moments[:, 0], moments[:, 1], moments[:, 2]
    n = counts.sum(0)
    mean = (counts * means).sum(0) / n.clamp_min(1)
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return torch.stack([n, mean, m2])
