// CUDA implementations of the bnext ops: the thin layer between torch and
// the raw-pointer launchers of launch.h. Argument checks are the CPU ops'
// own (csrc/checks.h), so both backends reject the same inputs with the same
// errors before anything is mutated. Outputs, statistics and the workspace
// come from torch's caching allocator; every launch goes on the current
// stream, and nothing here reads device memory on the host, so a training
// step can be captured in a CUDA graph. The one check that depends on
// values, memory_saving's nonzero weight, runs in the kernels that read the
// weight anyway (a device-side assert, as torch's CUDA kernels report such
// errors), so it costs no launch and no synchronisation.
//
// This file includes no CUDA header of torch (the stream comes through
// c10::Stream::native_handle), so it also compiles against a CPU-only torch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <string_view>

#include "../channel_layout.h"
#include "../checks.h"
#include "launch.h"

namespace bnext::cuda {

namespace {

using at::Tensor;
using std::optional;

bool has(const optional<Tensor>& t) {
  return t.has_value() && t->defined();
}

DType dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::Float;
    case at::kDouble: return DType::Double;
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    default: break;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(false, "bnext CUDA: unsupported dtype ", s);
}

Shape shape_of(const Tensor& dense) {
  const ChannelLayout L = make_layout(dense);
  return Shape{L.N, L.C, L.S, L.channels_inner};
}

cudaStream_t current_stream(const Tensor& t) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(t.device()).native_handle());
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "bnext: CUDA ", what, " failed: ", cudaGetErrorString(err));
}

Tensor workspace(const Tensor& like, std::size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// A per-channel tensor as the kernels read it: `dtype`, dense; undefined
// when absent. A no-op for the usual float32 parameters.
Tensor channel(const optional<Tensor>& t, at::ScalarType dtype) {
  return has(t) ? t->to(dtype).contiguous().view({-1}) : Tensor();
}

Tensor dense(const optional<Tensor>& t, at::MemoryFormat fmt) {
  return has(t) ? t->contiguous(fmt) : Tensor();
}

const void* ptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}

void* mut_ptr(Tensor& t) {
  return t.defined() ? t.mutable_data_ptr() : nullptr;
}

Tensor empty_output(const Tensor& input, at::MemoryFormat fmt) {
  return at::empty(input.sizes(), input.options().memory_format(fmt));
}

Act act_of(c10::string_view activation) {
  return parse_activation(std::string_view(activation.data(), activation.size()));
}

// memory_saving's host-side check (an invertible activation); the nonzero
// weight is checked on the device, by the statistics and backward kernels.
void check_memory_saving_cuda(c10::string_view activation, double negative_slope) {
  check_memory_saving_activation(
      std::string_view(activation.data(), activation.size()), negative_slope);
}

// Statistics + normalization (+ residual, activation): training forward.
std::tuple<Tensor, Tensor, Tensor, Tensor> train_forward(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& residual,
    double eps,
    Act act,
    double negative_slope,
    bool memory_saving) {
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor r = dense(residual, fmt);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const Shape shape = shape_of(x);
  const DType dt = dtype_of(input.scalar_type());
  const Tensor w = channel(weight, acc);
  const Tensor b = channel(bias, acc);
  const auto stat = x.options().dtype(acc);
  Tensor save_mean = at::empty({shape.C}, x.options().dtype(at::kDouble));
  Tensor save_invstd = at::empty({shape.C}, stat);
  Tensor unbiased_var = at::empty({shape.C}, stat);
  Tensor coef = at::empty({3 * shape.C}, stat);
  Tensor ws = workspace(x, batch_stats_workspace_bytes(shape, dt));
  const cudaStream_t stream = current_stream(x);
  check_cuda(
      launch_batch_stats(
          dt, shape, ptr(x), ptr(w), ptr(b), eps, memory_saving, ws.mutable_data_ptr(),
          save_mean.mutable_data_ptr<double>(), save_invstd.mutable_data_ptr(),
          unbiased_var.mutable_data_ptr(), coef.mutable_data_ptr(), /*moments=*/nullptr,
          stream),
      "batch statistics");
  Tensor out = empty_output(input, fmt);
  ForwardArgs args;
  args.x = ptr(x);
  args.residual = ptr(r);
  args.out = out.mutable_data_ptr();
  args.coef = coef.const_data_ptr();
  args.act = act;
  args.negative_slope = negative_slope;
  check_cuda(launch_normalize_act(dt, shape, args, stream), "normalization");
  return {out, save_mean, save_invstd, unbiased_var};
}

// Normalization with the running statistics, one pass: eval forward.
Tensor eval_forward(
    const Tensor& input,
    const Tensor& running_mean,
    const Tensor& running_var,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& residual,
    double eps,
    Act act,
    double negative_slope) {
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor r = dense(residual, fmt);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const Tensor rm = channel(running_mean, acc);
  const Tensor rv = channel(running_var, acc);
  const Tensor w = channel(weight, acc);
  const Tensor b = channel(bias, acc);
  Tensor out = empty_output(input, fmt);
  ForwardArgs args;
  args.x = ptr(x);
  args.residual = ptr(r);
  args.out = out.mutable_data_ptr();
  args.running_mean = ptr(rm);
  args.running_var = ptr(rv);
  args.weight = ptr(w);
  args.bias = ptr(b);
  args.eps = eps;
  args.act = act;
  args.negative_slope = negative_slope;
  check_cuda(
      launch_normalize_act(dtype_of(input.scalar_type()), shape_of(x), args, current_stream(x)),
      "eval normalization");
  return out;
}

// Both backwards: plain batch norm is act = identity, no residual, from the
// input. Returns (grad_input, grad_residual, grad_weight, grad_bias).
struct BackwardRequest {
  const Tensor& grad_output;
  const Tensor& saved;
  bool saved_is_output;
  const optional<Tensor>& weight;
  const optional<Tensor>& bias;
  const optional<Tensor>& residual;
  const optional<Tensor>& running_mean;
  const optional<Tensor>& running_var;
  const optional<Tensor>& save_mean;
  const optional<Tensor>& save_invstd;
  bool train;
  double eps;
  Act act;
  double negative_slope;
  bool want_input, want_residual, want_weight, want_bias;
};

std::array<optional<Tensor>, 4> backward(const BackwardRequest& q) {
  const at::MemoryFormat fmt = output_memory_format(q.saved);
  const Tensor s = q.saved.contiguous(fmt);
  const Tensor dy = q.grad_output.contiguous(fmt);
  const Tensor r = dense(q.residual, fmt);
  const at::ScalarType acc = acc_dtype(q.saved.scalar_type());
  const Shape shape = shape_of(s);
  const DType dt = dtype_of(q.saved.scalar_type());
  const Tensor mean = channel(q.train ? q.save_mean : q.running_mean, at::kDouble);
  const Tensor invstd_or_var = channel(q.train ? q.save_invstd : q.running_var, acc);
  const Tensor w = channel(q.weight, acc);
  const Tensor b = channel(q.bias, acc);
  const auto stat = s.options().dtype(acc);
  Tensor dx = q.want_input ? empty_output(q.saved, fmt) : Tensor();
  // With a residual, pass 1 writes g: it is grad_residual.
  Tensor g = r.defined() ? empty_output(q.saved, fmt) : Tensor();
  Tensor gw = q.want_weight ? at::empty({shape.C}, stat) : Tensor();
  Tensor gb = q.want_bias ? at::empty({shape.C}, stat) : Tensor();
  Tensor ws = workspace(s, backward_workspace_bytes(shape, dt));

  BackwardArgs a;
  a.grad_output = ptr(dy);
  a.saved = ptr(s);
  a.saved_is_output = q.saved_is_output;
  a.residual = ptr(r);
  a.weight = ptr(w);
  a.bias = ptr(b);
  a.mean = mean.const_data_ptr<double>();
  a.invstd_or_var = ptr(invstd_or_var);
  a.invstd_from_var = !q.train;
  a.eps = q.eps;
  a.train = q.train;
  a.act = q.act;
  a.negative_slope = q.negative_slope;
  a.grad_input = mut_ptr(dx);
  a.grad_residual = mut_ptr(g);
  a.grad_weight = mut_ptr(gw);
  a.grad_bias = mut_ptr(gb);
  check_cuda(
      launch_batch_norm_backward(dt, shape, a, ws.mutable_data_ptr(), current_stream(s)),
      "batch norm backward");

  const at::ScalarType param_dtype = has(q.weight) ? q.weight->scalar_type() : acc;
  std::array<optional<Tensor>, 4> out;
  if (q.want_input) out[0] = dx;
  if (q.want_residual) out[1] = g;
  if (q.want_weight) out[2] = gw.to(param_dtype);
  if (q.want_bias) out[3] = gb.to(param_dtype);
  return out;
}

// ------------------------------------------------------------------ the ops

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_train(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    double eps) {
  check_batch_norm_args(input, weight, bias, std::nullopt, std::nullopt);
  check_eps(eps, /*training=*/true);
  const c10::DeviceGuard guard(input.device());
  return train_forward(
      input, weight, bias, std::nullopt, eps, Act::Identity, 0.0, /*memory_saving=*/false);
}

Tensor batch_norm_eval(
    const Tensor& input,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    double eps) {
  check_batch_norm_call(input, weight, bias, running_mean, running_var, std::nullopt, false, eps);
  const c10::DeviceGuard guard(input.device());
  if (input.numel() == 0) {
    return empty_batch_output(input, weight, bias);
  }
  return eval_forward(
      input, *running_mean, *running_var, weight, bias, std::nullopt, eps, Act::Identity, 0.0);
}

void update_running_stats(
    Tensor& running_mean,
    Tensor& running_var,
    const Tensor& save_mean,
    const Tensor& unbiased_var,
    optional<double> momentum,
    const optional<Tensor>& num_batches_tracked) {
  check_update_running_args(
      running_mean, running_var, save_mean, unbiased_var, momentum, num_batches_tracked);
  const c10::DeviceGuard guard(save_mean.device());
  // As on the CPU: statistics in double stay double, anything else is read
  // as float32 (a float32 variance beside a float64 mean is widened exactly
  // in the kernel).
  const at::ScalarType acc = save_mean.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor m = save_mean.to(acc).contiguous();
  const bool var_ok = unbiased_var.scalar_type() == acc ||
      (acc == at::kDouble && unbiased_var.scalar_type() == at::kFloat);
  const Tensor v = (var_ok ? unbiased_var : unbiased_var.to(acc)).contiguous();
  Tensor count;
  if (!momentum.has_value()) {
    TORCH_CHECK(
        num_batches_tracked->device() == save_mean.device(),
        "update_running_stats: num_batches_tracked must be on the statistics' device");
    count = num_batches_tracked->to(at::kLong).contiguous();
  }
  // Dense buffers (the module case) are updated in place; anything else
  // through temporaries copied back.
  Tensor rm = running_mean.is_contiguous() ? running_mean : running_mean.contiguous();
  Tensor rv = running_var.is_contiguous() ? running_var : running_var.contiguous();
  check_cuda(
      launch_update_running(
          dtype_of(rm.scalar_type()), m.numel(), rm.mutable_data_ptr(), rv.mutable_data_ptr(),
          m.const_data_ptr(), acc == at::kDouble, v.const_data_ptr(),
          v.scalar_type() == at::kDouble, momentum.value_or(0.0),
          count.defined() ? count.const_data_ptr<int64_t>() : nullptr, current_stream(m)),
      "running-stat update");
  if (!rm.is_same(running_mean)) {
    running_mean.copy_(rm);
  }
  if (!rv.is_same(running_var)) {
    running_var.copy_(rv);
  }
}

std::tuple<optional<Tensor>, optional<Tensor>, optional<Tensor>> batch_norm_backward(
    const Tensor& grad_output,
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& save_mean,
    const optional<Tensor>& save_invstd,
    bool train,
    double eps,
    std::array<bool, 3> output_mask) {
  check_batch_norm_args(input, weight, std::nullopt, std::nullopt, std::nullopt);
  check_grad_output(grad_output, input);
  check_backward_statistics(
      train, running_mean, running_var, save_mean, save_invstd, "batch_norm_backward");
  const c10::DeviceGuard guard(input.device());
  const auto out = backward(BackwardRequest{
      grad_output, input, false, weight, std::nullopt, std::nullopt, running_mean, running_var,
      save_mean, save_invstd, train, eps, Act::Identity, 0.0, output_mask[0], false,
      output_mask[1], output_mask[2]});
  return {out[0], out[2], out[3]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_train(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& residual,
    double eps,
    c10::string_view activation,
    double negative_slope,
    bool memory_saving) {
  check_batch_norm_args(input, weight, bias, std::nullopt, std::nullopt);
  check_eps(eps, /*training=*/true);
  check_residual(input, residual);
  const Act act = act_of(activation);
  const c10::DeviceGuard guard(input.device());
  if (memory_saving) {
    check_memory_saving_cuda(activation, negative_slope);
  }
  return train_forward(input, weight, bias, residual, eps, act, negative_slope, memory_saving);
}

Tensor batch_norm_act_eval(
    const Tensor& input,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& residual,
    double eps,
    c10::string_view activation,
    double negative_slope,
    bool memory_saving) {
  check_batch_norm_call(input, weight, bias, running_mean, running_var, std::nullopt, false, eps);
  check_residual(input, residual);
  const Act act = act_of(activation);
  const c10::DeviceGuard guard(input.device());
  // The eval output needs no inverse; its backward (from the output) checks
  // the weight on the device.
  if (memory_saving) {
    check_memory_saving_cuda(activation, negative_slope);
  }
  if (input.numel() == 0) {
    return empty_batch_output(input, weight, bias);
  }
  return eval_forward(
      input, *running_mean, *running_var, weight, bias, residual, eps, act, negative_slope);
}

std::tuple<optional<Tensor>, optional<Tensor>, optional<Tensor>, optional<Tensor>>
batch_norm_act_backward(
    const Tensor& grad_output,
    const Tensor& saved,
    bool saved_is_output,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& residual,
    const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var,
    const optional<Tensor>& save_mean,
    const optional<Tensor>& save_invstd,
    bool train,
    double eps,
    c10::string_view activation,
    double negative_slope,
    std::array<bool, 4> output_mask) {
  check_batch_norm_args(saved, weight, bias, std::nullopt, std::nullopt);
  check_residual(saved, residual);
  check_grad_output(grad_output, saved);
  check_backward_statistics(
      train, running_mean, running_var, save_mean, save_invstd, "batch_norm_act_backward");
  TORCH_CHECK(
      !output_mask[1] || has(residual),
      "batch_norm_act_backward: grad_residual requested without a residual");
  const Act act = act_of(activation);
  const c10::DeviceGuard guard(saved.device());
  if (saved_is_output) {
    check_memory_saving_cuda(activation, negative_slope);
  }
  const auto out = backward(BackwardRequest{
      grad_output, saved, saved_is_output, weight, bias, residual, running_mean, running_var,
      save_mean, save_invstd, train, eps, act, negative_slope, output_mask[0], output_mask[1],
      output_mask[2], output_mask[3]});
  return {out[0], out[1], out[2], out[3]};
}

// ------------------------------------------------------------ the phase ops

Tensor batch_norm_moments(const Tensor& input) {
  check_batch_norm_args(input, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  const c10::DeviceGuard guard(input.device());
  const Tensor x = input.contiguous(output_memory_format(input));
  const Shape shape = shape_of(x);
  const DType dt = dtype_of(input.scalar_type());
  Tensor moments = at::empty({3, shape.C}, x.options().dtype(at::kDouble));
  Tensor ws = workspace(x, batch_stats_workspace_bytes(shape, dt));
  check_cuda(
      launch_batch_stats(
          dt, shape, ptr(x), nullptr, nullptr, 1.0, false, ws.mutable_data_ptr(), nullptr,
          nullptr, nullptr, nullptr, moments.mutable_data_ptr<double>(), current_stream(x)),
      "batch moments");
  return moments;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_merge_moments(
    const Tensor& moments,
    double eps) {
  check_moments(moments);
  check_eps(eps, /*training=*/true);
  const c10::DeviceGuard guard(moments.device());
  const Tensor m = moments.contiguous();
  const int64_t K = m.size(0);
  const int64_t C = m.size(2);
  const auto opts = m.options();
  Tensor mean = at::empty({C}, opts), invstd = at::empty({C}, opts);
  Tensor unbiased = at::empty({C}, opts), count = at::empty({C}, opts);
  check_cuda(
      launch_merge_moments(
          K, C, m.const_data_ptr<double>(), eps, mean.mutable_data_ptr<double>(),
          invstd.mutable_data_ptr<double>(), unbiased.mutable_data_ptr<double>(),
          count.mutable_data_ptr<double>(), current_stream(m)),
      "moment merge");
  return {mean, invstd, unbiased, count};
}

Tensor batch_norm_elemt(
    const Tensor& input,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const Tensor& mean,
    const Tensor& invstd,
    const optional<Tensor>& residual,
    c10::string_view activation,
    double negative_slope) {
  check_elemt_args(input, weight, bias, mean, invstd, residual);
  const Act act = act_of(activation);
  const c10::DeviceGuard guard(input.device());
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor r = dense(residual, fmt);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const Shape shape = shape_of(x);
  const DType dt = dtype_of(input.scalar_type());
  const Tensor m = channel(mean, at::kDouble);
  const Tensor is = channel(invstd, acc);
  const Tensor w = channel(weight, acc);
  const Tensor b = channel(bias, acc);
  Tensor coef = at::empty({3 * shape.C}, x.options().dtype(acc));
  const cudaStream_t stream = current_stream(x);
  check_cuda(
      launch_normalize_coeffs(
          dt, shape.C, m.const_data_ptr<double>(), ptr(is), ptr(w), ptr(b),
          coef.mutable_data_ptr(), stream),
      "normalize coefficients");
  Tensor out = empty_output(input, fmt);
  ForwardArgs args;
  args.x = ptr(x);
  args.residual = ptr(r);
  args.out = out.mutable_data_ptr();
  args.coef = coef.const_data_ptr();
  args.act = act;
  args.negative_slope = negative_slope;
  check_cuda(launch_normalize_act(dt, shape, args, stream), "normalization");
  return out;
}

// The phase ops' backward: the fused backward from the input, with the
// reduce pass's sums leaving (reduce) or the global sums entering (elemt).
BackwardArgs phase_backward_args(
    const Tensor& dy,
    const Tensor& x,
    const Tensor& r,
    const Tensor& w,
    const Tensor& b,
    const Tensor& mean,
    const Tensor& invstd,
    Act act,
    double negative_slope) {
  BackwardArgs a;
  a.grad_output = ptr(dy);
  a.saved = ptr(x);
  a.residual = ptr(r);
  a.weight = ptr(w);
  a.bias = ptr(b);
  a.mean = mean.const_data_ptr<double>();
  a.invstd_or_var = ptr(invstd);
  a.train = true;
  a.act = act;
  a.negative_slope = negative_slope;
  return a;
}

std::tuple<Tensor, optional<Tensor>, optional<Tensor>, optional<Tensor>>
batch_norm_backward_reduce(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& invstd,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& residual,
    c10::string_view activation,
    double negative_slope,
    std::array<bool, 3> output_mask) {
  check_backward_reduce_args(
      grad_output, input, weight, bias, mean, invstd, residual, output_mask[2]);
  const Act act = act_of(activation);
  const c10::DeviceGuard guard(input.device());
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor dy = grad_output.contiguous(fmt);
  const Tensor r = dense(residual, fmt);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const Shape shape = shape_of(x);
  const DType dt = dtype_of(input.scalar_type());
  const Tensor m = channel(mean, at::kDouble);
  const Tensor is = channel(invstd, acc);
  const Tensor w = channel(weight, acc);
  const Tensor b = channel(bias, acc);
  const auto stat = x.options().dtype(acc);
  Tensor g = r.defined() ? empty_output(input, fmt) : Tensor();
  Tensor sums = at::empty({2, shape.C}, x.options().dtype(at::kDouble));
  Tensor gw = output_mask[0] ? at::empty({shape.C}, stat) : Tensor();
  Tensor gb = output_mask[1] ? at::empty({shape.C}, stat) : Tensor();
  Tensor ws = workspace(x, backward_workspace_bytes(shape, dt));
  BackwardArgs a = phase_backward_args(dy, x, r, w, b, m, is, act, negative_slope);
  a.grad_residual = mut_ptr(g);
  a.grad_weight = mut_ptr(gw);
  a.grad_bias = mut_ptr(gb);
  a.sums_out = sums.mutable_data_ptr<double>();
  check_cuda(
      launch_batch_norm_backward(dt, shape, a, ws.mutable_data_ptr(), current_stream(x)),
      "backward reduce");
  const at::ScalarType param_dtype = has(weight) ? weight->scalar_type() : acc;
  optional<Tensor> gw_out, gb_out, gr_out;
  if (output_mask[0]) gw_out = gw.to(param_dtype);
  if (output_mask[1]) gb_out = gb.to(param_dtype);
  if (output_mask[2]) gr_out = g;
  return {sums, gw_out, gb_out, gr_out};
}

Tensor batch_norm_backward_elemt(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& invstd,
    const optional<Tensor>& weight,
    const optional<Tensor>& bias,
    const optional<Tensor>& residual,
    const optional<Tensor>& grad_residual,
    const Tensor& sums,
    const Tensor& count,
    c10::string_view activation,
    double negative_slope) {
  check_backward_elemt_args(
      grad_output, input, weight, bias, mean, invstd, residual, grad_residual, sums, count);
  const Act act = act_of(activation);
  const c10::DeviceGuard guard(input.device());
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor dy = grad_output.contiguous(fmt);
  const Tensor r = dense(residual, fmt);
  const Tensor g = dense(grad_residual, fmt);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const Shape shape = shape_of(x);
  const DType dt = dtype_of(input.scalar_type());
  const Tensor m = channel(mean, at::kDouble);
  const Tensor is = channel(invstd, acc);
  const Tensor w = channel(weight, acc);
  const Tensor b = channel(bias, acc);
  const Tensor s = channel(sums, at::kDouble);
  const Tensor n = channel(count, at::kDouble);
  Tensor dx = empty_output(input, fmt);
  Tensor ws = workspace(x, backward_workspace_bytes(shape, dt));
  BackwardArgs a = phase_backward_args(dy, x, r, w, b, m, is, act, negative_slope);
  a.grad_input = dx.mutable_data_ptr();
  a.sums_in = s.const_data_ptr<double>();
  a.count_in = n.const_data_ptr<double>();
  a.g_in = ptr(g);
  check_cuda(
      launch_batch_norm_backward(dt, shape, a, ws.mutable_data_ptr(), current_stream(x)),
      "backward elementwise");
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, CUDA, m) {
  m.impl("batch_norm_train", &batch_norm_train);
  m.impl("batch_norm_eval", &batch_norm_eval);
  m.impl("update_running_stats", &update_running_stats);
  m.impl("batch_norm_backward", &batch_norm_backward);
  m.impl("batch_norm_act_train", &batch_norm_act_train);
  m.impl("batch_norm_act_eval", &batch_norm_act_eval);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward);
  m.impl("batch_norm_moments", &batch_norm_moments);
  m.impl("batch_norm_merge_moments", &batch_norm_merge_moments);
  m.impl("batch_norm_elemt", &batch_norm_elemt);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt);
}

}  // namespace bnext::cuda
