// Training statistics on CUDA: a grid-split Welford pass writes one partial
// (n, mean, m2) per (split, channel), then one warp per channel merges the
// partials in float64 and derives save_mean, save_invstd, unbiased_var and
// the normalize coefficients. Two launches, no atomics, so the result is
// deterministic for a given device and shape.
//
// Every value is accumulated minus a shift, the channel's first element: a
// float mean of ~1e4 * std is only good to half an ulp of 1e4 (5e-4 std),
// while x - shift is exact (Sterbenz) and O(std), so its float mean is good
// to ~1e-7 std and shift + mean is formed in float64.
#include "../moments.h"
#include "device_utils.cuh"

namespace bnext::cuda {

namespace {

// Loads in flight per thread before their merges: the merges form one
// dependent chain, the loads do not.
constexpr int kUnroll = 4;

// Partials: three arrays of splits * C acc values, index split * C + c.
template <typename A>
struct Partials {
  A* n;
  A* mean;
  A* m2;
};

template <typename A>
Partials<A> carve_partials(void* workspace, int64_t splits, int64_t C) {
  char* base = static_cast<char*>(workspace);
  const std::size_t one = align256(sizeof(A) * static_cast<std::size_t>(splits * C));
  return {reinterpret_cast<A*>(base), reinterpret_cast<A*>(base + one),
          reinterpret_cast<A*>(base + 2 * one)};
}

// Merges the block's Welford states into thread 0's.
template <typename A>
__device__ Welford<A> block_merge(Welford<A> w) {
  __shared__ A sn[kThreads / 32], smean[kThreads / 32], sm2[kThreads / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  w.merge_warp();
  if (lane == 0) {
    sn[warp] = w.n;
    smean[warp] = w.mean;
    sm2[warp] = w.m2;
  }
  __syncthreads();
  Welford<A> out;
  if (warp == 0) {
    if (lane < static_cast<int>(blockDim.x / 32)) {
      out.n = sn[lane];
      out.mean = smean[lane];
      out.m2 = sm2[lane];
    }
    out.merge_warp();
  }
  return out;
}

// Planar (NCHW): block (c, split) reads vectors [begin, end) of channel c's
// N * SV vectors (SV = S / kVec per plane).
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) stats_planar_kernel(
    const T* __restrict__ x,
    int64_t C,
    int64_t SV,
    int64_t vecs,
    int64_t chunk,
    Partials<acc_of<T>> out) {
  using A = acc_of<T>;
  const int64_t c = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < vecs ? begin + chunk : vecs;
  const A shift = to_acc(x[c * SV * kVec]);
  Welford<A> w;
  for (int64_t k0 = begin + threadIdx.x; k0 < end; k0 += kUnroll * kThreads) {
    A v[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * kThreads;
      if (k < end) {
        const int64_t n = index_div(k, SV);
        const int64_t s = k - n * SV;
        load_acc<T, kVec>(x + ((n * C + c) * SV + s) * kVec, v[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (k0 + u * kThreads < end) {
        // The pack's own mean and m2 (two-pass in registers), then one
        // Chan merge: one division per pack instead of per element.
        A sum = 0;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          v[u][j] -= shift;
          sum += v[u][j];
        }
        const A m = sum * (A(1) / A(kVec));
        A q = 0;
#pragma unroll
        for (int j = 0; j < kVec; ++j) q += (v[u][j] - m) * (v[u][j] - m);
        w.merge(A(kVec), m, q);
      }
    }
  }
  const Welford<A> total = block_merge(w);
  if (threadIdx.x == 0) {
    const int64_t i = split * C + c;
    out.n[i] = total.n;
    out.mean[i] = total.mean;
    out.m2[i] = total.m2;
  }
}

// Channels-inner (NHWC, (N, C)): a (tx, ty) block covers tx * kVec channels;
// its ty thread rows stride over the split's rows. All lanes of a thread see
// the same rows, so they share one count and one division per row.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) stats_inner_kernel(
    const T* __restrict__ x,
    int64_t rows,
    int64_t CV,
    int64_t rows_per_split,
    Partials<acc_of<T>> out) {
  using A = acc_of<T>;
  __shared__ A s_mean[kThreads * kVec];
  __shared__ A s_m2[kThreads * kVec];
  __shared__ A s_n[kThreads];
  const int tx = blockDim.x;
  const int ty = blockDim.y;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * tx + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t r0 = split * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < rows ? r0 + rows_per_split : rows;
  A n = 0, mean[kVec], m2[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) mean[j] = m2[j] = 0;
  if (cv < CV) {
    A shift[kVec];
    load_acc<T, kVec>(x + cv * kVec, shift);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += ty) {
      A v[kVec];
      load_acc<T, kVec>(x + (r * CV + cv) * kVec, v);
      n += A(1);
      const A inv = A(1) / n;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        v[j] -= shift[j];
        const A d = v[j] - mean[j];
        mean[j] += d * inv;
        m2[j] += d * (v[j] - mean[j]);
      }
    }
  }
  const int t = threadIdx.y * tx + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    s_mean[t * kVec + j] = mean[j];
    s_m2[t * kVec + j] = m2[j];
  }
  s_n[t] = n;
  __syncthreads();
  if (threadIdx.y != 0 || cv >= CV) {
    return;
  }
  const int64_t C = CV * kVec;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    Welford<A> w;
    for (int yy = 0; yy < ty; ++yy) {
      const int src = yy * tx + threadIdx.x;
      w.merge(s_n[src], s_mean[src * kVec + j], s_m2[src * kVec + j]);
    }
    const int64_t i = split * C + cv * kVec + j;
    out.n[i] = w.n;
    out.mean[i] = w.mean;
    out.m2[i] = w.m2;
  }
}

// One warp per channel: float64 merge of the splits, then everything the
// op returns. Formulas as csrc/cpu/channel_math.cpp, so that CPU and CUDA
// agree to the partials' rounding.
template <typename T, typename A = acc_of<T>>
__global__ void stats_finalize_kernel(
    const T* __restrict__ x,
    int64_t C,
    int64_t S,
    bool channels_inner,
    int64_t splits,
    Partials<A> in,
    const A* __restrict__ weight,
    const A* __restrict__ bias,
    double eps,
    bool require_nonzero_weight,
    double* __restrict__ save_mean,
    A* __restrict__ save_invstd,
    A* __restrict__ unbiased_var,
    A* __restrict__ coef,
    double* __restrict__ moments) {
  const int lane = threadIdx.x % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (c >= C) {
    return;
  }
  Welford<double> w;
  for (int64_t p = lane; p < splits; p += 32) {
    const int64_t i = p * C + c;
    w.merge(static_cast<double>(in.n[i]), static_cast<double>(in.mean[i]),
            static_cast<double>(in.m2[i]));
  }
  w.merge_warp();
  if (lane != 0) {
    return;
  }
  if (require_nonzero_weight && weight != nullptr) {
    BNEXT_DEVICE_REQUIRE(weight[c] != A(0), BNEXT_MEMORY_SAVING_ZERO_WEIGHT);
  }
  // An empty batch has no statistics: mean 0 and variance 0, so that no NaN
  // leaks into the (empty) output's gradients.
  const double shift = w.n > 0 ? static_cast<double>(to_acc(x[channels_inner ? c : c * S])) : 0.0;
  const double mean = w.n > 0 ? shift + w.mean : 0.0;
  double var_d = w.n > 0 ? w.m2 / w.n : 0.0;
  var_d = var_d < 0.0 ? 0.0 : var_d;  // rounding only; NaN passes
  const A var = static_cast<A>(var_d);
  const A invstd = A(1) / sqrt(var + static_cast<A>(eps));
  if (moments != nullptr) {
    moments[c] = w.n;
    moments[C + c] = mean;
    moments[2 * C + c] = w.n > 0 ? w.m2 : 0.0;
  }
  if (save_mean == nullptr) {
    return;  // moments only (batch_norm_moments)
  }
  save_mean[c] = mean;
  save_invstd[c] = invstd;
  unbiased_var[c] = static_cast<A>(static_cast<double>(var) * (w.n / (w.n - 1.0)));
  const A mean_hi = static_cast<A>(mean);
  const double lo = mean - static_cast<double>(mean_hi);
  const A alpha = invstd * (weight != nullptr ? weight[c] : A(1));
  const A b = bias != nullptr ? bias[c] : A(0);
  coef[c] = mean_hi;
  coef[C + c] = alpha;
  coef[2 * C + c] = static_cast<A>(static_cast<double>(b) - lo * static_cast<double>(alpha));
}

}  // namespace

std::size_t batch_stats_workspace_bytes(const Shape& shape, DType dtype) {
  const std::size_t acc = dtype == DType::Double ? sizeof(double) : sizeof(float);
  return 3 * align256(acc * static_cast<std::size_t>(max_reduction_splits(shape) * shape.C)) + 256;
}

cudaError_t launch_batch_stats(
    DType dtype,
    const Shape& shape,
    const void* x,
    const void* weight,
    const void* bias,
    double eps,
    bool require_nonzero_weight,
    void* workspace,
    double* save_mean,
    void* save_invstd,
    void* unbiased_var,
    void* coef,
    double* moments,
    cudaStream_t stream) {
  if (shape.C == 0) {
    return cudaSuccess;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_of<T>;
    const int vec = pick_vec<T>(shape.channels_inner ? shape.C : shape.S, {x});
    return dispatch_vec<T>(vec, [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      const ReductionGeometry g =
          reduction_geometry(shape, kVec, int64_t(kThreads) * kUnroll * 2);
      const Partials<A> parts = carve_partials<A>(workspace, g.splits, shape.C);
      if (g.splits > 0) {
        const T* xp = static_cast<const T*>(x);
        if (!shape.channels_inner) {
          stats_planar_kernel<T, kVec><<<g.grid, g.block, 0, stream>>>(
              xp, shape.C, shape.S / kVec, shape.N * (shape.S / kVec), g.per_split, parts);
        } else {
          stats_inner_kernel<T, kVec><<<g.grid, g.block, 0, stream>>>(
              xp, shape.count(), shape.C / kVec, g.per_split, parts);
        }
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) {
          return err;
        }
      }
      constexpr int kWarps = kThreads / 32;
      const unsigned blocks = static_cast<unsigned>((shape.C + kWarps - 1) / kWarps);
      stats_finalize_kernel<T><<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(x), shape.C, shape.S, shape.channels_inner, g.splits, parts,
          static_cast<const A*>(weight), static_cast<const A*>(bias), eps, require_nonzero_weight,
          save_mean, static_cast<A*>(save_invstd), static_cast<A*>(unbiased_var),
          static_cast<A*>(coef), moments);
      return cudaGetLastError();
    });
  });
}

namespace {

// One thread per channel, all float64: the merge of batch_norm_merge_moments
// (csrc/moments.h, the CPU's arithmetic).
__global__ void merge_moments_kernel(
    int64_t K,
    int64_t C,
    const double* __restrict__ moments,
    double eps,
    double* __restrict__ mean,
    double* __restrict__ invstd,
    double* __restrict__ unbiased_var,
    double* __restrict__ count) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) {
    return;
  }
  MergedMoments r;
  for (int64_t k = 0; k < K; ++k) {
    const double* part = moments + k * 3 * C;
    r.add(part[c], part[C + c], part[2 * C + c]);
  }
  count[c] = r.n;
  mean[c] = r.mean;
  invstd[c] = 1.0 / sqrt(r.m2 / r.n + eps);
  unbiased_var[c] = r.m2 / (r.n - 1.0);
}

}  // namespace

cudaError_t launch_merge_moments(
    int64_t K,
    int64_t C,
    const double* moments,
    double eps,
    double* mean,
    double* invstd,
    double* unbiased_var,
    double* count,
    cudaStream_t stream) {
  if (C == 0) {
    return cudaSuccess;
  }
  const unsigned blocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  merge_moments_kernel<<<blocks, kThreads, 0, stream>>>(
      K, C, moments, eps, mean, invstd, unbiased_var, count);
  return cudaGetLastError();
}

}  // namespace bnext::cuda
