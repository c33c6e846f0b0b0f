#include "channel_math.h"

#include <ATen/ops/from_blob.h>
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>

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
    // The usual case (a dense (C,) tensor of the right dtype) is returned as
    // it is: at a few microseconds per call, the dispatched no-op conversion
    // and view counted.
    if (t->scalar_type() == acc && t->dim() == 1 && t->is_contiguous()) {
      return *t;
    }
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

namespace {

// A (C,) float32 or float64 tensor read as double: the backward's inputs
// and the batch statistics come in either dtype, and converting them first
// cost a tensor allocation and a dispatched copy each (four per backward).
class ChannelValues {
 public:
  explicit ChannelValues(const at::Tensor& t) {
    if (t.scalar_type() == at::kDouble) {
      d_ = t.const_data_ptr<double>();
    } else {
      TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat, "bnext: per-channel ",
                            t.scalar_type(), " where float32 or float64 was expected");
      f_ = t.const_data_ptr<float>();
    }
  }
  double operator[](int64_t i) const {
    return d_ != nullptr ? d_[i] : static_cast<double>(f_[i]);
  }

 private:
  const float* f_ = nullptr;
  const double* d_ = nullptr;
};

}  // namespace

ChannelScratch::ChannelScratch(int64_t channels, int slots, const at::TensorOptions& options)
    : channels_(channels),
      // 64-byte aligned slots, each wide enough for C doubles.
      slot_bytes_((channels * static_cast<int64_t>(sizeof(double)) + 63) / 64 * 64),
      slots_(slots),
      buffer_(at::empty({slots * slot_bytes_ + 64}, options.dtype(at::kByte))) {}

at::Tensor ChannelScratch::take(at::ScalarType dtype) {
  TORCH_INTERNAL_ASSERT(used_ < slots_, "bnext: ChannelScratch has no slot left");
  auto base = reinterpret_cast<std::uintptr_t>(buffer_.mutable_data_ptr());
  base = (base + 63) / 64 * 64;
  void* p = reinterpret_cast<void*>(base + static_cast<std::uintptr_t>(used_++ * slot_bytes_));
  return at::from_blob(p, {channels_}, buffer_.options().dtype(dtype));
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
    at::ScalarType coeff_dtype,
    at::ScalarType grad_dtype,
    ChannelScratch* scratch) {
  const int64_t C = mean.numel();
  const bool have_sums = sum_dy.defined();
  // Gradients are written in their dtype when it is float32 or float64;
  // otherwise in float64 and converted at the end.
  const bool grad_direct = grad_dtype == at::kFloat || grad_dtype == at::kDouble;
  const at::ScalarType grad_store = grad_direct ? grad_dtype : at::kDouble;
  const auto c_opts = mean.options().dtype(coeff_dtype);
  const auto g_opts = mean.options().dtype(grad_store);
  auto coeff = [&] { return scratch != nullptr ? scratch->take(coeff_dtype) : at::empty({C}, c_opts); };
  BackwardCoeffs out{coeff(), coeff(), coeff(), at::empty({have_sums ? C : 0}, g_opts),
                     at::empty({have_sums ? C : 0}, g_opts)};
  // Everything per channel in double; the centres' offsets from the exact
  // mean are folded into the constant terms.
  const double* m = mean.const_data_ptr<double>();
  const ChannelValues rm(reduce_mean), km(kernel_mean), is(invstd), pw(w);
  const double* sdy = have_sums ? sum_dy.const_data_ptr<double>() : nullptr;
  const double* sxm = have_sums ? sum_dy_xmu.const_data_ptr<double>() : nullptr;
  const double inv_n = 1.0 / static_cast<double>(n);
  AT_DISPATCH_FLOATING_TYPES(coeff_dtype, "bnext_backward_coeffs", [&] {
    using coef_t = scalar_t;
    coef_t* pa = out.a.mutable_data_ptr<coef_t>();
    coef_t* pb = out.bx.mutable_data_ptr<coef_t>();
    coef_t* pk = out.k.mutable_data_ptr<coef_t>();
    AT_DISPATCH_FLOATING_TYPES(grad_store, "bnext_backward_grads", [&] {
      using grad_t = scalar_t;
      grad_t* gw = have_sums ? out.grad_weight.mutable_data_ptr<grad_t>() : nullptr;
      grad_t* gb = have_sums ? out.grad_bias.mutable_data_ptr<grad_t>() : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const ChannelBackward r = have_sums
            ? channel_backward(m[c], rm[c], km[c], is[c], pw[c], sdy[c], sxm[c], inv_n, train)
            : channel_backward_no_sums(is[c], pw[c]);
        pa[c] = static_cast<coef_t>(r.a);
        pb[c] = static_cast<coef_t>(r.b);
        pk[c] = static_cast<coef_t>(r.k);
        if (have_sums) {
          gw[c] = static_cast<grad_t>(r.grad_weight);
          gb[c] = static_cast<grad_t>(r.grad_bias);
        }
      }
    });
  });
  if (!grad_direct && have_sums) {
    out.grad_weight = out.grad_weight.to(grad_dtype);
    out.grad_bias = out.grad_bias.to(grad_dtype);
  }
  return out;
}

namespace {

template <typename run_t>
void update_running_inplace(
    run_t* rm,
    run_t* rv,
    const ChannelValues& mean,
    const ChannelValues& var,
    int64_t C,
    double factor) {
  for (int64_t c = 0; c < C; ++c) {
    const double m = (1.0 - factor) * static_cast<double>(rm[c]) + factor * mean[c];
    const double v = (1.0 - factor) * static_cast<double>(rv[c]) + factor * var[c];
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
        update_running_inplace<scalar_t>(
            rm.mutable_data_ptr<scalar_t>(), rv.mutable_data_ptr<scalar_t>(),
            ChannelValues(batch_mean), ChannelValues(batch_unbiased_var), C, factor);
      });
  if (!rm.is_same(running_mean)) {
    running_mean.copy_(rm);
  }
  if (!rv.is_same(running_var)) {
    running_var.copy_(rv);
  }
}

}  // namespace bnext::cpu
