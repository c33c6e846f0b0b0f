#include "channel_math.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <cmath>

namespace bnext::cpu {

namespace {

// out[i] = fn(T(), i) over C channels, into a new tensor like `like`. `fn`
// receives a typed tag so it can fetch its operands' pointers once, outside
// the loop: TensorBase::data_ptr<T>() type-checks on every call.
template <typename Fn>
at::Tensor map_channels(const at::Tensor& like, Fn&& fn) {
  at::Tensor out = at::empty_like(like);
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "bnext_channel_math", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    auto body = fn(scalar_t{});
    for (int64_t i = 0; i < like.numel(); ++i) {
      o[i] = static_cast<scalar_t>(body(i));
    }
  });
  return out;
}

}  // namespace

at::Tensor channel_param(
    const std::optional<at::Tensor>& t,
    int64_t channels,
    at::ScalarType acc,
    double fill) {
  if (t.has_value() && t->defined()) {
    return t->to(acc).contiguous().view({channels});
  }
  return at::full({channels}, fill, at::TensorOptions().dtype(acc));
}

at::Tensor invstd_from_var(const at::Tensor& var, double eps) {
  return map_channels(var, [&](auto tag) {
    using T = decltype(tag);
    const T* v = var.const_data_ptr<T>();
    const T e = static_cast<T>(eps);
    return [=](int64_t i) { return invstd_of(v[i], e); };
  });
}

at::Tensor unbiased_from_biased(const at::Tensor& var, int64_t n) {
  // n == 1 gives 0/0 = NaN, as torch's kernels do.
  const double scale = static_cast<double>(n) / static_cast<double>(n - 1);
  return map_channels(var, [&](auto tag) {
    using T = decltype(tag);
    const T* v = var.const_data_ptr<T>();
    return [=](int64_t i) { return static_cast<double>(v[i]) * scale; };
  });
}

NormalizeCoeffs normalize_coeffs(
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& w,
    const at::Tensor& b,
    at::ScalarType acc) {
  const int64_t C = mean.numel();
  const auto opts = mean.options().dtype(acc);
  NormalizeCoeffs out{at::empty({C}, opts), at::empty({C}, opts), at::empty({C}, opts)};
  AT_DISPATCH_FLOATING_TYPES(acc, "bnext_normalize_coeffs", [&] {
    const double* m = mean.const_data_ptr<double>();
    const scalar_t* is = invstd.const_data_ptr<scalar_t>();
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* hi = out.mean_hi.mutable_data_ptr<scalar_t>();
    scalar_t* alpha = out.alpha.mutable_data_ptr<scalar_t>();
    scalar_t* beta = out.beta.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const ChannelNormalize<scalar_t> k = channel_normalize(m[c], is[c], pw[c], pb[c]);
      hi[c] = k.mean_hi;
      alpha[c] = k.alpha;
      beta[c] = k.beta;
    }
  });
  return out;
}

BackwardCoeffs backward_coeffs(
    const at::Tensor& mean,
    const at::Tensor& reduce_mean,
    const at::Tensor& kernel_mean,
    const at::Tensor& invstd,
    const at::Tensor& w,
    const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu,
    int64_t n,
    bool train,
    at::ScalarType coeff_dtype) {
  const int64_t C = mean.numel();
  const auto d_opts = mean.options().dtype(at::kDouble);
  const bool have_sums = sum_dy.defined();
  // Everything per channel in double; the centres' offsets from the exact
  // mean are folded into the constant terms.
  const at::Tensor rmean = reduce_mean.to(at::kDouble);
  const at::Tensor kmean = kernel_mean.to(at::kDouble);
  const at::Tensor invs_d = invstd.to(at::kDouble);
  const at::Tensor w_d = w.to(at::kDouble);
  at::Tensor a = at::empty({C}, d_opts), bx = at::zeros({C}, d_opts), k = at::zeros({C}, d_opts);
  BackwardCoeffs out{a, bx, k, at::empty({have_sums ? C : 0}, d_opts),
                     at::empty({have_sums ? C : 0}, d_opts)};
  const double* m = mean.const_data_ptr<double>();
  const double* rm = rmean.const_data_ptr<double>();
  const double* km = kmean.const_data_ptr<double>();
  const double* is = invs_d.const_data_ptr<double>();
  const double* pw = w_d.const_data_ptr<double>();
  const double* sdy = have_sums ? sum_dy.const_data_ptr<double>() : nullptr;
  const double* sxm = have_sums ? sum_dy_xmu.const_data_ptr<double>() : nullptr;
  double* pa = a.mutable_data_ptr<double>();
  double* pb = bx.mutable_data_ptr<double>();
  double* pk = k.mutable_data_ptr<double>();
  double* gw = have_sums ? out.grad_weight.mutable_data_ptr<double>() : nullptr;
  double* gb = have_sums ? out.grad_bias.mutable_data_ptr<double>() : nullptr;
  const double inv_n = 1.0 / static_cast<double>(n);
  for (int64_t c = 0; c < C; ++c) {
    pa[c] = pw[c] * is[c];
    if (!have_sums) {
      continue;
    }
    const double s = sdy[c];
    const double sx = sxm[c] - (m[c] - rm[c]) * s;  // sum dy * (x - mean)
    gw[c] = sx * is[c];
    gb[c] = s;
    if (train) {
      // dx = w*invstd*(dy - mean(dy) - (x - mean)*invstd^2*mean(dy*(x - mean)))
      const double b = -pw[c] * is[c] * is[c] * is[c] * sx * inv_n;
      pb[c] = b;
      pk[c] = -pw[c] * is[c] * s * inv_n - (m[c] - km[c]) * b;
    }
  }
  if (coeff_dtype != at::kDouble) {
    out.a = a.to(coeff_dtype);
    out.bx = bx.to(coeff_dtype);
    out.k = k.to(coeff_dtype);
  }
  return out;
}

namespace {

template <typename run_t, typename stat_t>
void update_running_inplace(
    run_t* rm,
    run_t* rv,
    const stat_t* mean,
    const stat_t* var,
    int64_t C,
    double factor) {
  for (int64_t c = 0; c < C; ++c) {
    const double m = (1.0 - factor) * static_cast<double>(rm[c]) +
        factor * static_cast<double>(mean[c]);
    const double v = (1.0 - factor) * static_cast<double>(rv[c]) +
        factor * static_cast<double>(var[c]);
    rm[c] = static_cast<run_t>(m);
    rv[c] = static_cast<run_t>(v);
  }
}

}  // namespace

void update_running(
    at::Tensor& running_mean,
    at::Tensor& running_var,
    const at::Tensor& batch_mean,
    const at::Tensor& batch_unbiased_var,
    double factor) {
  // Dense buffers (the module case) are updated in place in one loop that
  // cannot fail part-way; anything else goes through temporaries + copy_.
  at::Tensor rm = running_mean.is_contiguous() ? running_mean : running_mean.contiguous();
  at::Tensor rv = running_var.is_contiguous() ? running_var : running_var.contiguous();
  const int64_t C = batch_mean.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rm.scalar_type(), "bnext_update_running", [&] {
        using run_t = scalar_t;
        if (batch_mean.scalar_type() == at::kDouble) {
          update_running_inplace<run_t, double>(
              rm.mutable_data_ptr<run_t>(), rv.mutable_data_ptr<run_t>(),
              batch_mean.const_data_ptr<double>(),
              batch_unbiased_var.const_data_ptr<double>(), C, factor);
        } else {
          update_running_inplace<run_t, float>(
              rm.mutable_data_ptr<run_t>(), rv.mutable_data_ptr<run_t>(),
              batch_mean.const_data_ptr<float>(),
              batch_unbiased_var.const_data_ptr<float>(), C, factor);
        }
      });
  if (!rm.is_same(running_mean)) {
    running_mean.copy_(rm);
  }
  if (!rv.is_same(running_var)) {
    running_var.copy_(rv);
  }
}

}  // namespace bnext::cpu
