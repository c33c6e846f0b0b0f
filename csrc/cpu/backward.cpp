// Backward: one fused reduction pass (sum dy and sum dy * (x - mean) read x
// and dy once), then one elementwise pass for grad_input.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "layout.h"

namespace bnext::cpu {

namespace {

template <typename scalar_t>
void backward_reduce_impl(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean_t,
    at::Tensor& sum_dy_out,
    at::Tensor& sum_dy_xmu_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const ChannelLayout L = make_layout(x);
  const int64_t C = L.C;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* mean = mean_t.const_data_ptr<acc_t>();
  const int nthreads = at::get_num_threads();
  // Per-thread sums [tid][2][C]. The gradient sums cancel heavily (dy is
  // zero-mean in practice), so they accumulate in double: float32 partial
  // sums measured up to ~1e-4 relative error at 1e5 elements per channel.
  std::vector<double> partial(static_cast<size_t>(nthreads) * 2 * C, 0.0);

  auto run = [&](int tid, int64_t c, int64_t offset, int64_t len) {
    const double m = mean[c];
    double s = 0, sx = 0;
#pragma omp simd reduction(+ : s, sx)
    for (int64_t i = 0; i < len; ++i) {
      const double g = static_cast<acc_t>(dyp[offset + i]);
      s += g;
      sx += g * (static_cast<acc_t>(xp[offset + i]) - m);
    }
    double* part = partial.data() + static_cast<size_t>(tid) * 2 * C;
    part[c] += s;
    part[C + c] += sx;
  };

  auto rows = [&](int tid, int64_t offset, int64_t nrows) {
    double* s = partial.data() + static_cast<size_t>(tid) * 2 * C;
    double* sx = s + C;
    for (int64_t r = 0; r < nrows; ++r) {
      const scalar_t* g = dyp + offset + r * C;
      const scalar_t* xi = xp + offset + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double gv = static_cast<acc_t>(g[c]);
        s[c] += gv;
        sx[c] += gv * (static_cast<acc_t>(xi[c]) - mean[c]);
      }
    }
  };

  parallel_reduce_chunks(L, run, rows);

  acc_t* sum_dy = sum_dy_out.mutable_data_ptr<acc_t>();
  acc_t* sum_dy_xmu = sum_dy_xmu_out.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    double s = 0, sx = 0;
    for (int t = 0; t < nthreads; ++t) {
      s += partial[static_cast<size_t>(t) * 2 * C + c];
      sx += partial[static_cast<size_t>(t) * 2 * C + C + c];
    }
    sum_dy[c] = static_cast<acc_t>(s);
    sum_dy_xmu[c] = static_cast<acc_t>(sx);
  }
}

template <typename scalar_t>
void backward_elementwise_impl(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean_t,
    const at::Tensor& a_t,
    const at::Tensor& b_t,
    const at::Tensor& c_t,
    bool use_x,
    at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const ChannelLayout L = make_layout(dy);
  const int64_t C = L.C;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = use_x ? x.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const acc_t* mean = use_x ? mean_t.const_data_ptr<acc_t>() : nullptr;
  const acc_t* a = a_t.const_data_ptr<acc_t>();
  const acc_t* b = use_x ? b_t.const_data_ptr<acc_t>() : nullptr;
  const acc_t* k = use_x ? c_t.const_data_ptr<acc_t>() : nullptr;

  parallel_elementwise(
      L,
      [&](int64_t c, int64_t offset, int64_t len) {
        const scalar_t* g = dyp + offset;
        scalar_t* out = dxp + offset;
        const acc_t ac = a[c];
        if (use_x) {
          const scalar_t* xi = xp + offset;
          const acc_t m = mean[c], bc = b[c], kc = k[c];
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            out[i] = static_cast<scalar_t>(
                static_cast<acc_t>(g[i]) * ac +
                (static_cast<acc_t>(xi[i]) - m) * bc + kc);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            out[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * ac);
          }
        }
      },
      [&](int64_t offset, int64_t nrows) {
        for (int64_t r = 0; r < nrows; ++r) {
          const scalar_t* g = dyp + offset + r * C;
          scalar_t* out = dxp + offset + r * C;
          if (use_x) {
            const scalar_t* xi = xp + offset + r * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              out[c] = static_cast<scalar_t>(
                  static_cast<acc_t>(g[c]) * a[c] +
                  (static_cast<acc_t>(xi[c]) - mean[c]) * b[c] + k[c]);
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              out[c] = static_cast<scalar_t>(static_cast<acc_t>(g[c]) * a[c]);
            }
          }
        }
      });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> backward_reduce(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean) {
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  const int64_t C = x.size(1);
  at::Tensor sum_dy = at::empty({C}, opts);
  at::Tensor sum_dy_xmu = at::empty({C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_backward_reduce", [&] {
        backward_reduce_impl<scalar_t>(dy, x, mean, sum_dy, sum_dy_xmu);
      });
  return {sum_dy, sum_dy_xmu};
}

void backward_elementwise(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& a,
    const at::Tensor& b,
    const at::Tensor& c,
    bool use_x,
    at::Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dy.scalar_type(), "bnext_backward_elementwise",
      [&] {
        backward_elementwise_impl<scalar_t>(dy, x, mean, a, b, c, use_x, dx);
      });
}

}  // namespace bnext::cpu
