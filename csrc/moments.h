// Per-channel (count, mean, M2) of a batch and their exact merge (Chan,
// Golub & LeVeque's parallel update), shared by the CPU and CUDA phase ops.
// Header-only and free of torch so that nvcc compiles it too.
#pragma once

#ifdef __CUDACC__
#define BNEXT_HOST_DEVICE __host__ __device__
#else
#define BNEXT_HOST_DEVICE
#endif

namespace bnext {

struct MergedMoments {
  double n = 0.0, mean = 0.0, m2 = 0.0;

  // Adds a part of count `nb`; an empty part changes nothing, so ranks with
  // empty batches merge exactly. Never E[x^2] - E[x]^2.
  BNEXT_HOST_DEVICE void add(double nb, double mean_b, double m2_b) {
    if (nb <= 0.0) {
      return;
    }
    const double total = n + nb;
    const double delta = mean_b - mean;
    mean += delta * (nb / total);
    m2 += m2_b + delta * delta * (n * nb / total);
    n = total;
  }
};

}  // namespace bnext
