// The forward elementwise pass on CUDA:
//   out = act((x - mean_hi) * alpha + beta + residual)
// one grid-stride pass of packed loads/stores over the dense tensor, in
// either layout. Training reads the coefficients launch_batch_stats wrote;
// eval derives them from the running statistics in the same pass, so eval
// is a single launch.
#include "activation.cuh"
#include "device_utils.cuh"

namespace bnext::cuda {

namespace {

template <typename A>
struct ForwardCoefs {
  const A* coef;  // [mean_hi | alpha | beta], or null for eval
  const A* running_mean;
  const A* running_var;
  const A* weight;
  const A* bias;
  A eps;
  int64_t C;

  __device__ __forceinline__ void fetch(int64_t c, A& mean_hi, A& alpha, A& beta) const {
    if (coef != nullptr) {
      mean_hi = coef[c];
      alpha = coef[C + c];
      beta = coef[2 * C + c];
    } else {
      // As the CPU eval path: the running mean is already in acc, so it is
      // its own mean_hi and beta needs no correction term.
      mean_hi = running_mean[c];
      alpha = A(1) / sqrt(running_var[c] + eps) * (weight != nullptr ? weight[c] : A(1));
      beta = bias != nullptr ? bias[c] : A(0);
    }
  }
};

// Vector j covers kVec elements of one channel (planar: SV vectors per
// plane) or of kVec consecutive channels (channels-inner: CV per row).
template <typename T, int kVec, Act kAct>
__global__ void __launch_bounds__(kThreads) normalize_act_kernel(
    const T* __restrict__ x,
    const T* __restrict__ residual,
    T* __restrict__ out,
    int64_t nvec,
    bool channels_inner,
    int64_t SV,
    int64_t CV,
    ForwardCoefs<acc_of<T>> k,
    acc_of<T> slope) {
  using A = acc_of<T>;
  using Fn = ActFn<kAct, A>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nvec;
       j += stride) {
    A v[kVec], r[kVec], mh[kVec], al[kVec], be[kVec];
    load_acc<T, kVec>(x + j * kVec, v);
    if (residual != nullptr) {
      load_acc<T, kVec>(residual + j * kVec, r);
    }
    if (channels_inner) {
      const int64_t c0 = (j - index_div(j, CV) * CV) * kVec;
#pragma unroll
      for (int e = 0; e < kVec; ++e) k.fetch(c0 + e, mh[e], al[e], be[e]);
    } else {
      const int64_t plane = index_div(j, SV);
      k.fetch(plane - index_div(plane, k.C) * k.C, mh[0], al[0], be[0]);
#pragma unroll
      for (int e = 1; e < kVec; ++e) {
        mh[e] = mh[0];
        al[e] = al[0];
        be[e] = be[0];
      }
    }
    A y[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      A z = (v[e] - mh[e]) * al[e] + be[e];
      if (residual != nullptr) z += r[e];
      y[e] = Fn::fwd(z, slope);
    }
    store_acc<T, kVec>(out + j * kVec, y);
  }
}

// One thread per channel: the training coefficients (as stats_finalize_kernel
// derives them) from given statistics, for batch_norm_elemt.
template <typename A>
__global__ void given_stats_coef_kernel(
    int64_t C,
    const double* __restrict__ mean,
    const A* __restrict__ invstd,
    const A* __restrict__ weight,
    const A* __restrict__ bias,
    A* __restrict__ coef) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) {
    return;
  }
  const double m = mean[c];
  const A mean_hi = static_cast<A>(m);
  const A alpha = invstd[c] * (weight != nullptr ? weight[c] : A(1));
  const A b = bias != nullptr ? bias[c] : A(0);
  coef[c] = mean_hi;
  coef[C + c] = alpha;
  coef[2 * C + c] =
      static_cast<A>(static_cast<double>(b) - (m - static_cast<double>(mean_hi)) * static_cast<double>(alpha));
}

}  // namespace

cudaError_t launch_normalize_coeffs(
    DType dtype,
    int64_t C,
    const double* mean,
    const void* invstd,
    const void* weight,
    const void* bias,
    void* coef,
    cudaStream_t stream) {
  if (C == 0) {
    return cudaSuccess;
  }
  const unsigned blocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  auto launch = [&](auto tag) {
    using A = decltype(tag);
    given_stats_coef_kernel<A><<<blocks, kThreads, 0, stream>>>(
        C, mean, static_cast<const A*>(invstd), static_cast<const A*>(weight),
        static_cast<const A*>(bias), static_cast<A*>(coef));
    return cudaGetLastError();
  };
  return dtype == DType::Double ? launch(double{}) : launch(float{});
}

cudaError_t launch_normalize_act(
    DType dtype, const Shape& shape, const ForwardArgs& a, cudaStream_t stream) {
  if (shape.numel() == 0) {
    return cudaSuccess;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_of<T>;
    const int vec = pick_vec<T>(
        shape.channels_inner ? shape.C : shape.S, {a.x, a.residual, a.out});
    return dispatch_vec<T>(vec, [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      return dispatch_act(a.act, [&](auto act_tag) {
        constexpr Act kAct = decltype(act_tag)::value;
        const int64_t nvec = shape.numel() / kVec;
        const ForwardCoefs<A> k{
            static_cast<const A*>(a.coef),   static_cast<const A*>(a.running_mean),
            static_cast<const A*>(a.running_var), static_cast<const A*>(a.weight),
            static_cast<const A*>(a.bias),   static_cast<A>(a.eps),
            shape.C};
        normalize_act_kernel<T, kVec, kAct><<<elementwise_blocks(nvec), kThreads, 0, stream>>>(
            static_cast<const T*>(a.x), static_cast<const T*>(a.residual),
            static_cast<T*>(a.out), nvec, shape.channels_inner, shape.S / kVec,
            shape.C / kVec, k, static_cast<A>(a.negative_slope));
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace bnext::cuda
