// Per-channel running (count, mean, M2) with Chan et al.'s pairwise merge.
// Chunks are summarised in the accumulation type (float32, or float64 for
// float64 input) and merged in double: merges are few, and the merge is where
// cancellation between large means would otherwise hurt.
#pragma once
#include <cstdint>

namespace bnext::cpu {

struct WelfordStat {
  int64_t n = 0;
  double mean = 0.0;
  double m2 = 0.0;

  // Chan, Golub & LeVeque (1979): combine two disjoint partial results.
  void merge(int64_t nb, double mean_b, double m2_b) {
    if (nb == 0) {
      return;
    }
    if (n == 0) {
      n = nb;
      mean = mean_b;
      m2 = m2_b;
      return;
    }
    const int64_t total = n + nb;
    const double delta = mean_b - mean;
    const double wb = static_cast<double>(nb) / static_cast<double>(total);
    mean += delta * wb;
    m2 += m2_b + delta * delta * static_cast<double>(n) * wb;
    n = total;
  }

  void merge(const WelfordStat& o) { merge(o.n, o.mean, o.m2); }
};

}  // namespace bnext::cpu
