"""Exact merge of per-channel (count, mean, M2) rows, for recalibrate_batchnorm
(across batches and ranks). The rows come from ``bnext::batch_norm_moments``.

Merging is count-weighted (Chan, Golub & LeVeque's parallel variance), in
float64, never E[x^2] - E[x]^2. ``bnext::batch_norm_merge_moments`` does the
same for SyncBatchNorm but refuses a total count of at most 1, which
recalibration must accept (it then stores NaN as torch would).
"""

import torch


def merge(moments):
    """Merge a (K, 3, C) stack of moments into one (3, C)."""
    counts, means, m2s = moments[:, 0], moments[:, 1], moments[:, 2]
    n = counts.sum(0)
    mean = (counts * means).sum(0) / n.clamp_min(1)
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return torch.stack([n, mean, m2])
