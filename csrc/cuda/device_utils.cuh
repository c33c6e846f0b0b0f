// Building blocks shared by the kernel files: dtype dispatch, 16-byte packed
// loads/stores, warp reductions, the Welford/Chan merge, launch geometry.
// CUDA runtime only (see launch.h).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "launch.h"

namespace bnext::cuda {

// ------------------------------------------------------------------ dtypes

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccOf<T>::type;

template <typename T>
__device__ __forceinline__ acc_of<T> to_acc(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return v;
  }
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_of<T> v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// Calls fn(T{}) with the CUDA type of `dtype` (bit-compatible with torch's).
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float: return fn(float{});
    case DType::Double: return fn(double{});
    case DType::Half: return fn(__half{});
    case DType::BFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------ packed access

// kVec elements moved as one aligned access (16 bytes at full width).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ void load_acc(const T* p, acc_of<T> (&out)[kVec]) {
  const Pack<T, kVec> pk = *reinterpret_cast<const Pack<T, kVec>*>(p);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    out[k] = to_acc(pk.v[k]);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void store_acc(T* p, const acc_of<T> (&in)[kVec]) {
  Pack<T, kVec> pk;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    pk.v[k] = from_acc<T>(in[k]);
  }
  *reinterpret_cast<Pack<T, kVec>*>(p) = pk;
}

// Widest pack (at most 16 bytes) that every pointer's alignment and the
// contiguous run length `run` (elements between channel changes: S for
// planar, C for channels-inner) allow.
template <typename T>
int pick_vec(int64_t run, std::initializer_list<const void*> ptrs) {
  int vec = static_cast<int>(16 / sizeof(T));
  auto fits = [&](int v) {
    if (run % v != 0) {
      return false;
    }
    for (const void* p : ptrs) {
      if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % (sizeof(T) * v) != 0) {
        return false;
      }
    }
    return true;
  };
  while (vec > 1 && !fits(vec)) {
    vec /= 2;
  }
  return vec;
}

// Calls fn(std::integral_constant<int, V>{}) for the runtime vec, which is
// a power of two no wider than 16 bytes of T. Only full width and 1 are
// instantiated (compile time); a narrower fit runs as 1.
template <typename T, typename Fn>
cudaError_t dispatch_vec(int vec, Fn&& fn) {
  constexpr int kFull = static_cast<int>(16 / sizeof(T));
  if (vec == kFull) {
    return fn(std::integral_constant<int, kFull>{});
  }
  return fn(std::integral_constant<int, 1>{});
}

// a / b for non-negative indices, in 32 bits when both fit: a 64-bit
// division is a long software sequence on the GPU.
__device__ __forceinline__ int64_t index_div(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) {
    return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  }
  return a / b;
}

// --------------------------------------------------------------- reductions

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// Count, mean and sum of squared deviations of a set of values. Counts are
// carried as the accumulation type: exact to 2^24 in float, which is more
// than one thread or block ever sees, and merged across blocks in float64.
template <typename A>
struct Welford {
  A n = 0, mean = 0, m2 = 0;

  __device__ __forceinline__ void merge(A nb, A mean_b, A m2_b) {
    const A total = n + nb;
    if (nb == A(0)) {
      return;
    }
    const A delta = mean_b - mean;
    const A wb = nb / total;
    mean += delta * wb;
    m2 += m2_b + delta * delta * n * wb;
    n = total;
  }

  __device__ __forceinline__ void merge_warp() {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      const A nb = __shfl_xor_sync(0xffffffffu, n, o);
      const A mb = __shfl_xor_sync(0xffffffffu, mean, o);
      const A m2b = __shfl_xor_sync(0xffffffffu, m2, o);
      merge(nb, mb, m2b);
    }
  }
};

// ------------------------------------------------------------------ checks

// A check that depends on tensor values fails on the device, as torch's own
// CUDA kernels do (CUDA_KERNEL_ASSERT): a host exception would need a
// synchronisation per call, which also rules out CUDA-graph capture. The
// error surfaces at the next synchronising call as "device-side assert
// triggered", with `msg` printed by the device.
#define BNEXT_DEVICE_REQUIRE(cond, msg)                                              \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      __assert_fail(msg, __FILE__, static_cast<unsigned>(__LINE__), __func__);      \
    }                                                                                \
  } while (0)

// memory_saving recovers x_hat = (y - bias) / weight, so a zero weight is
// an argument error (the CPU ops raise ValueError for it).
#define BNEXT_MEMORY_SAVING_ZERO_WEIGHT                                              \
  "bnext: memory_saving=True cannot recover x_hat = (y - bias) / weight in a "       \
  "channel whose weight is 0; use memory_saving=False for this layer"

// ------------------------------------------------------------------ geometry

constexpr int kThreads = 256;

// Streaming multiprocessors of the current device, looked up once per
// device (cudaDeviceGetAttribute is legal during graph capture).
int sm_count();

// Blocks for a grid-stride elementwise pass over `work` items.
inline unsigned elementwise_blocks(int64_t work) {
  const int64_t want = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 8;
  return static_cast<unsigned>(want < 1 ? 1 : (want < cap ? want : cap));
}

// Reductions are split over `splits` blocks per channel group so that the
// grid has about four blocks per SM, but no block gets less than
// `min_per_block` items.
inline int reduction_splits(int64_t groups, int64_t items, int64_t min_per_block) {
  const int64_t target = static_cast<int64_t>(sm_count()) * 4;
  int64_t splits = (target + groups - 1) / groups;
  const int64_t by_work = (items + min_per_block - 1) / min_per_block;
  if (splits > by_work) splits = by_work;
  if (splits > 65535) splits = 65535;
  return static_cast<int>(splits < 1 ? 1 : splits);
}

// Launch shape of a per-channel reduction pass over a pack width `vec`:
//  planar:         grid (C, splits) of kThreads, each block a run of
//                  `per_split` packs of one channel;
//  channels-inner: grid (channel tiles, splits) of (tx, ty) blocks, tx
//                  threads across a tile of tx * vec channels, ty thread
//                  rows striding over a run of `per_split` rows.
// No splits for an empty batch (the finalize then sees a count of 0).
struct ReductionGeometry {
  dim3 grid, block;
  int64_t splits = 0;
  int64_t per_split = 0;
};

inline ReductionGeometry reduction_geometry(const Shape& s, int vec, int64_t planar_min_per_block) {
  ReductionGeometry g;
  if (s.count() == 0) {
    return g;
  }
  auto split = [&g](int64_t groups, int64_t items, int64_t min_per_block) {
    g.splits = reduction_splits(groups, items, min_per_block);
    g.per_split = (items + g.splits - 1) / g.splits;
    g.splits = (items + g.per_split - 1) / g.per_split;  // no empty splits
  };
  if (!s.channels_inner) {
    split(s.C, s.N * (s.S / vec), planar_min_per_block);
    g.grid = dim3(static_cast<unsigned>(s.C), static_cast<unsigned>(g.splits));
    g.block = dim3(kThreads);
  } else {
    const int64_t CV = s.C / vec;
    int tx = 1;
    while (tx < 32 && tx < CV) tx *= 2;
    const int ty = kThreads / tx;
    const int64_t groups = (CV + tx - 1) / tx;
    split(groups, s.count(), int64_t(ty) * 8);
    g.grid = dim3(static_cast<unsigned>(groups), static_cast<unsigned>(g.splits));
    g.block = dim3(tx, ty);
  }
  return g;
}

// Upper bound of ReductionGeometry::splits for any pack width (workspace
// is sized before the pointers' alignment is known).
inline int64_t max_reduction_splits(const Shape& s) {
  return s.count() == 0 ? 0 : static_cast<int64_t>(sm_count()) * 4;
}

// Workspace carving: arrays placed at 256-byte aligned offsets.
inline std::size_t align256(std::size_t bytes) {
  return (bytes + 255) / 256 * 256;
}

}  // namespace bnext::cuda
