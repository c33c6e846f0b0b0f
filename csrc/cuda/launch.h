// Launchers of bnext's CUDA kernels over raw device pointers.
//
// This header and the *.cu files include only the CUDA runtime, so the
// kernels compile with nvcc alone (CI has no CUDA build of torch); the
// binding, ops_cuda.cpp, is the one file that includes torch. Every launcher
// enqueues on `stream`, never synchronises, and returns the launch status
// (cudaGetLastError), which the binding turns into an exception.
//
// Per-channel arrays named "acc" are double for DType::Double input and float
// otherwise, and are dense with C elements. Weight/bias pointers may be null
// (weight 1, bias 0). Workspace is device memory the caller allocates (from
// the caching allocator, so a CUDA graph can capture it), at least the bytes
// the matching *_workspace_bytes returns, 256-byte aligned.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../activation_kind.h"

namespace bnext::cuda {

enum class DType { Float, Double, Half, BFloat16 };

// A dense (N, C, *) tensor as channel_layout.h describes it.
struct Shape {
  int64_t N = 0;
  int64_t C = 0;
  int64_t S = 0;  // product of the spatial sizes
  bool channels_inner = false;
  int64_t count() const { return N * S; }  // elements per channel
  int64_t numel() const { return N * C * S; }
};

// ---------------------------------------------------------------- training
std::size_t batch_stats_workspace_bytes(const Shape& shape, DType dtype);

// Batch statistics of x (Welford per thread, Chan merges, float64 across
// blocks) and everything derived from them, per channel:
//   save_mean (float64), save_invstd = 1/sqrt(var + eps), unbiased_var =
//   var * n/(n-1) (acc), and coef = [mean_hi | alpha | beta] (acc, 3*C), the
//   coefficients of out = (x - mean_hi) * alpha + beta.
// An empty batch (N*S == 0) gets mean 0 and variance 0, like the CPU kernels.
// require_nonzero_weight (memory_saving) makes a zero weight a device-side
// assert (device_utils.cuh, BNEXT_DEVICE_REQUIRE). `moments`, when not null,
// receives the (count, mean, M2) rows of batch_norm_moments (float64, 3*C);
// save_mean null then skips save_mean, save_invstd, unbiased_var and coef.
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
    cudaStream_t stream);

// Merge of K stacked (count, mean, M2) rows (moments: float64, K*3*C) into
// per-channel mean, invstd = 1/sqrt(M2/n + eps), unbiased_var = M2/(n-1)
// and count, all float64 (csrc/moments.h).
cudaError_t launch_merge_moments(
    int64_t K,
    int64_t C,
    const double* moments,
    double eps,
    double* mean,
    double* invstd,
    double* unbiased_var,
    double* count,
    cudaStream_t stream);

// ---------------------------------------------------------------- forward
// coef = [mean_hi | alpha | beta] (acc, 3*C) from a float64 mean and an acc
// invstd, as launch_batch_stats derives them: batch_norm_elemt's.
cudaError_t launch_normalize_coeffs(
    DType dtype,
    int64_t C,
    const double* mean,
    const void* invstd,
    const void* weight,
    const void* bias,
    void* coef,
    cudaStream_t stream);

// out = act((x - mean_hi) * alpha + beta + residual), one pass. The
// coefficients are `coef` (training, from launch_batch_stats) or, when coef
// is null, computed in the pass from running_mean/running_var (acc), weight,
// bias and eps (eval).
struct ForwardArgs {
  const void* x = nullptr;
  const void* residual = nullptr;  // may be null
  void* out = nullptr;
  const void* coef = nullptr;
  const void* running_mean = nullptr;
  const void* running_var = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  double eps = 0.0;
  Act act = Act::Identity;
  double negative_slope = 0.0;
};
cudaError_t launch_normalize_act(
    DType dtype, const Shape& shape, const ForwardArgs& args, cudaStream_t stream);

// running = (1 - f) * running + f * batch, computed in float64, with
// f = momentum, or f = 1 / *num_batches_tracked (read on the device) when
// num_batches_tracked is non-null. mean/var are float64 or float32
// (mean_is_double / var_is_double); running buffers are `running_dtype`.
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
    cudaStream_t stream);

// ---------------------------------------------------------------- backward
// Backward of out = act(batch_norm(x) + residual) (act = identity and no
// residual for plain batch norm), as in the CPU fused_kernels.h:
//   g = dy * act'(z), t = x - mean_hi (from the input) or
//   t = act^-1(y) - residual - bias = w * x_hat (from the output),
//   pass 1: sum_g, sum_gt per channel (and g -> grad_residual),
//   pass 2: grad_input = g * A + t * B + K.
// From the output, a zero weight is a device-side assert (x_hat is lost).
struct BackwardArgs {
  const void* grad_output = nullptr;
  const void* saved = nullptr;  // x, or the forward's output
  bool saved_is_output = false;
  const void* residual = nullptr;  // may be null
  const void* weight = nullptr;    // acc, may be null
  const void* bias = nullptr;      // acc, may be null
  const double* mean = nullptr;    // float64: save_mean or running_mean
  // save_invstd (acc), or running_var (acc) when invstd_from_var, with eps.
  const void* invstd_or_var = nullptr;
  bool invstd_from_var = false;
  double eps = 0.0;
  bool train = true;
  Act act = Act::Identity;
  double negative_slope = 0.0;
  // Outputs, each null when not wanted. grad_residual gets g (x's dtype and
  // layout); grad_weight/grad_bias are acc.
  void* grad_input = nullptr;
  void* grad_residual = nullptr;
  void* grad_weight = nullptr;
  void* grad_bias = nullptr;
  // The phase ops (training, from the input). sums_out: the reduce pass's
  // [sum g | sum g * (x - mean)] (float64, 2*C), for batch_norm_backward_reduce
  // (grad_input stays null). sums_in and count_in (float64, 2*C and C): the
  // global sums and counts for grad_input, replacing the reduce pass, for
  // batch_norm_backward_elemt; g_in then is that pass's g (grad_residual),
  // needed with a residual.
  double* sums_out = nullptr;
  const double* sums_in = nullptr;
  const double* count_in = nullptr;
  const void* g_in = nullptr;
};
std::size_t backward_workspace_bytes(const Shape& shape, DType dtype);
cudaError_t launch_batch_norm_backward(
    DType dtype,
    const Shape& shape,
    const BackwardArgs& args,
    void* workspace,
    cudaStream_t stream);

}  // namespace bnext::cuda
