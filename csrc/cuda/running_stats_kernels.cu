// The running-statistics update on CUDA: one tiny launch over C channels.
// With momentum=None the factor 1 / num_batches_tracked is read on the
// device, so the op never syncs with the host and can be graph-captured.
#include "device_utils.cuh"

namespace bnext::cuda {

namespace {

template <typename T>
__device__ __forceinline__ double to_double(T v) {
  return static_cast<double>(to_acc(v));
}

template <typename T>
__device__ __forceinline__ T from_double(double v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    // Through float, as c10::Half / BFloat16 convert a double on the CPU.
    return from_acc<T>(static_cast<float>(v));
  }
}

// Both new values are computed before either buffer is written, as on the
// CPU (running_mean and running_var may alias in a caller's mistake).
template <typename R, typename M, typename V>
__global__ void update_running_kernel(
    int64_t C,
    R* running_mean,
    R* running_var,
    const M* __restrict__ mean,
    const V* __restrict__ var,
    double momentum,
    const int64_t* __restrict__ num_batches_tracked) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) {
    return;
  }
  const double f = num_batches_tracked != nullptr
      ? 1.0 / static_cast<double>(*num_batches_tracked)
      : momentum;
  const double m = (1.0 - f) * to_double(running_mean[c]) + f * static_cast<double>(mean[c]);
  const double v = (1.0 - f) * to_double(running_var[c]) + f * static_cast<double>(var[c]);
  running_mean[c] = from_double<R>(m);
  running_var[c] = from_double<R>(v);
}

template <typename Fn>
cudaError_t dispatch_float_or_double(bool is_double, Fn&& fn) {
  return is_double ? fn(double{}) : fn(float{});
}

}  // namespace

cudaError_t launch_update_running(
    DType running_dtype,
    int64_t C,
    void* running_mean,
    void* running_var,
    const void* mean,
    bool mean_is_double,
    const void* var,
    bool var_is_double,
    double momentum,
    const int64_t* num_batches_tracked,
    cudaStream_t stream) {
  if (C == 0) {
    return cudaSuccess;
  }
  return dispatch_dtype(running_dtype, [&](auto run_tag) {
    using R = decltype(run_tag);
    return dispatch_float_or_double(mean_is_double, [&](auto mean_tag) {
      using M = decltype(mean_tag);
      return dispatch_float_or_double(var_is_double, [&](auto var_tag) {
        using V = decltype(var_tag);
        const unsigned blocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
        update_running_kernel<R, M, V><<<blocks, kThreads, 0, stream>>>(
            C, static_cast<R*>(running_mean), static_cast<R*>(running_var),
            static_cast<const M*>(mean), static_cast<const V*>(var), momentum,
            num_batches_tracked);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace bnext::cuda
