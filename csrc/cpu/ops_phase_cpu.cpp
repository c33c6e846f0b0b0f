// CPU implementations of the phase ops (csrc/ops.cpp): a training step cut
// where SyncBatchNorm exchanges statistics. Each phase runs the passes the
// single-device ops run (batch_stats, normalize_act, the backward reduce and
// elementwise kernels); only the per-channel arithmetic between them is here.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <string_view>

#include "../checks.h"
#include "channel_math.h"
#include "fused_kernels.h"
#include "kernels.h"
#include "../moments.h"
#include "op_table.h"
#include "op_utils.h"

namespace bnext::cpu {

namespace {

using at::Tensor;
using std::optional;

ActSpec spec_of(c10::string_view activation, double negative_slope) {
  return ActSpec{parse_activation(std::string_view(activation.data(), activation.size())),
                 negative_slope};
}

// The plain kernels serve identity without a residual; everything else goes
// through the fused ones, as the single-device ops do.
bool plain(const ActSpec& spec, const Tensor& residual) {
  return spec.act == Act::Identity && !residual.defined();
}

Tensor batch_norm_moments(const Tensor& input) {
  check_batch_norm_args(input, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  const int64_t C = input.size(1);
  const int64_t n = per_channel_count(input);
  const Tensor x = input.contiguous(output_memory_format(input));
  Tensor out = at::empty({3, C}, x.options().dtype(at::kDouble));
  const auto [mean, var] = batch_stats(x);
  double* o = out.mutable_data_ptr<double>();
  const double* m = mean.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "bnext_moments", [&] {
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      o[c] = static_cast<double>(n);
      o[C + c] = n > 0 ? m[c] : 0.0;
      o[2 * C + c] = n > 1 ? static_cast<double>(v[c]) * static_cast<double>(n) : 0.0;
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_merge_moments(
    const Tensor& moments,
    double eps) {
  check_moments(moments);
  check_eps(eps, /*training=*/true);
  const int64_t K = moments.size(0);
  const int64_t C = moments.size(2);
  const Tensor mm = moments.contiguous();
  const auto opts = mm.options();
  Tensor mean = at::empty({C}, opts), invstd = at::empty({C}, opts);
  Tensor unbiased = at::empty({C}, opts), count = at::empty({C}, opts);
  const double* p = mm.const_data_ptr<double>();
  double* pm = mean.mutable_data_ptr<double>();
  double* pi = invstd.mutable_data_ptr<double>();
  double* pu = unbiased.mutable_data_ptr<double>();
  double* pn = count.mutable_data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    MergedMoments r;
    for (int64_t k = 0; k < K; ++k) {
      const double* part = p + k * 3 * C;
      r.add(part[c], part[C + c], part[2 * C + c]);
    }
    TORCH_CHECK_VALUE(
        r.n > 1.0, "Expected more than 1 value per channel when training, got ",
        static_cast<int64_t>(r.n), " values over all ranks");
    pn[c] = r.n;
    pm[c] = r.mean;
    pi[c] = 1.0 / std::sqrt(r.m2 / r.n + eps);
    pu[c] = r.m2 / (r.n - 1.0);
  }
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
  const ActSpec spec = spec_of(activation, negative_slope);
  const int64_t C = input.size(1);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  Tensor out = empty_output(input, fmt);  // first: see empty_output
  const NormalizeCoeffs k = normalize_coeffs(
      channel_param(mean, C, at::kDouble, 0.0), channel_param(invstd, C, acc, 1.0),
      channel_param(weight, C, acc, 1.0), channel_param(bias, C, acc, 0.0), acc);
  normalize_act(x, dense_or_undefined(residual, fmt), k.mean_hi, k.alpha, k.beta, spec, out);
  return out;
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
  const ActSpec spec = spec_of(activation, negative_slope);
  const int64_t C = input.size(1);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor dy = grad_output.contiguous(fmt);
  const Tensor r = dense_or_undefined(residual, fmt);
  Tensor g = r.defined() ? empty_output(input, fmt) : Tensor();  // first: see empty_output
  const Tensor m = channel_param(mean, C, at::kDouble, 0.0);
  const Tensor is = channel_param(invstd, C, acc, 1.0);
  const NormalizeCoeffs k =
      normalize_coeffs(m, is, channel_param(weight, C, acc, 1.0),
                       channel_param(bias, C, acc, 0.0), acc);
  const auto d_opts = x.options().dtype(at::kDouble);
  Tensor sum_g = at::empty({C}, d_opts), sum_gt = at::empty({C}, d_opts);
  if (plain(spec, r)) {
    backward_reduce(dy, x, k.mean_hi, sum_g, sum_gt);
  } else {
    const GradSource src{x, false, r, k.mean_hi, k.alpha, k.beta, spec};
    act_backward_reduce(dy, src, g, sum_g, sum_gt);
  }
  // Both sums were taken around mean_hi; the exchanged sums are around the
  // float64 mean, so that every rank's share adds up to the global sum.
  Tensor sums = at::empty({2, C}, d_opts);
  const at::ScalarType param_dtype = has(weight) ? weight->scalar_type() : acc;
  Tensor grad_weight = at::empty({C}, d_opts), grad_bias = at::empty({C}, d_opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "bnext_backward_reduce_sums", [&] {
    const double* pm = m.const_data_ptr<double>();
    const scalar_t* ph = k.mean_hi.const_data_ptr<scalar_t>();
    const scalar_t* pi = is.const_data_ptr<scalar_t>();
    const double* sg = sum_g.const_data_ptr<double>();
    const double* sgt = sum_gt.const_data_ptr<double>();
    double* out = sums.mutable_data_ptr<double>();
    double* gw = grad_weight.mutable_data_ptr<double>();
    double* gb = grad_bias.mutable_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      const double sx = sgt[c] - (pm[c] - static_cast<double>(ph[c])) * sg[c];
      out[c] = sg[c];
      out[C + c] = sx;
      gw[c] = sx * static_cast<double>(pi[c]);
      gb[c] = sg[c];
    }
  });
  optional<Tensor> gw_out, gb_out, gr_out;
  if (output_mask[0]) gw_out = grad_weight.to(param_dtype);
  if (output_mask[1]) gb_out = grad_bias.to(param_dtype);
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
  const ActSpec spec = spec_of(activation, negative_slope);
  const int64_t C = input.size(1);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const at::MemoryFormat fmt = output_memory_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor dy = grad_output.contiguous(fmt);
  const Tensor r = dense_or_undefined(residual, fmt);
  Tensor dx = empty_output(input, fmt);  // first: see empty_output
  const Tensor m = channel_param(mean, C, at::kDouble, 0.0);
  const Tensor is = channel_param(invstd, C, acc, 1.0);
  const Tensor w = channel_param(weight, C, acc, 1.0);
  const NormalizeCoeffs nk = normalize_coeffs(m, is, w, channel_param(bias, C, acc, 0.0), acc);
  // Every channel has the global count (the merge sums the ranks' counts).
  const Tensor n = count.to(at::kDouble).contiguous();
  const int64_t total = C > 0 ? static_cast<int64_t>(n.const_data_ptr<double>()[0]) : 0;
  const Tensor s = sums.to(at::kDouble).contiguous().view({2, C});
  // float32 through the plain kernel is evaluated in double around the
  // float64 mean (as batch_norm_backward does); the fused kernel works on
  // t = x - mean_hi with float64 coefficients.
  const bool plain_path = plain(spec, r);
  const bool exact_f32 = plain_path && input.scalar_type() == at::kFloat;
  const at::ScalarType coeff_dtype = plain_path && !exact_f32 ? acc : at::kDouble;
  // The sums are around the float64 mean: it is the reduce centre.
  const BackwardCoeffs k = backward_coeffs(
      m, m, exact_f32 ? m : nk.mean_hi, is, w, s[0], s[1], total, /*train=*/true, coeff_dtype,
      at::kDouble);
  const Tensor &A = k.a, &B = k.bx, &K = k.k;
  if (plain_path) {
    backward_elementwise(dy, x, exact_f32 ? m : nk.mean_hi, A, B, K, /*use_x=*/true, dx);
  } else {
    const GradSource src{x, false, r, nk.mean_hi, nk.alpha, nk.beta, spec};
    act_backward_elementwise(dy, src, dense_or_undefined(grad_residual, fmt), A, B, K, dx);
  }
  return dx;
}

}  // namespace

void fill_phase_ops(OpTable& table) {
  table.batch_norm_moments = &batch_norm_moments;
  table.batch_norm_merge_moments = &batch_norm_merge_moments;
  table.batch_norm_elemt = &batch_norm_elemt;
  table.batch_norm_backward_reduce = &batch_norm_backward_reduce;
  table.batch_norm_backward_elemt = &batch_norm_backward_elemt;
}

}  // namespace bnext::cpu
