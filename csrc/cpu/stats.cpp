// Batch statistics: one pass over memory. Each chunk (a run of one channel,
// or a block of rows) is small enough to be read twice from cache: once for
// its shifted sum, once for its M2 around the chunk mean. Chunks then merge
// with Chan's formula. Shifting by the chunk's first value keeps the float32
// sums small even when |mean| >> std, so the variance stays accurate.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "layout.h"
#include "welford.h"

namespace bnext::cpu {

namespace {

template <typename scalar_t>
void batch_stats_impl(
    const at::Tensor& x,
    const ChannelLayout& L,
    at::Tensor& mean_out,
    at::Tensor& var_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t C = L.C;
  const int nthreads = at::get_num_threads();
  std::vector<WelfordStat> partial(static_cast<size_t>(nthreads) * C);
  // Per-thread scratch for the channels-inner path: shift, sum, m2.
  std::vector<acc_t> scratch(
      L.channels_inner ? static_cast<size_t>(nthreads) * 3 * C : 0);

  auto run = [&](int tid, int64_t c, int64_t offset, int64_t len) {
    const scalar_t* p = xp + offset;
    const acc_t shift = static_cast<acc_t>(p[0]);
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < len; ++i) {
      sum += static_cast<acc_t>(p[i]) - shift;
    }
    const acc_t shifted_mean = sum / static_cast<acc_t>(len);
    acc_t m2 = 0;
#pragma omp simd reduction(+ : m2)
    for (int64_t i = 0; i < len; ++i) {
      const acc_t d = (static_cast<acc_t>(p[i]) - shift) - shifted_mean;
      m2 += d * d;
    }
    partial[static_cast<size_t>(tid) * C + c].merge(
        len, static_cast<double>(shift) + static_cast<double>(shifted_mean),
        static_cast<double>(m2));
  };

  auto rows = [&](int tid, int64_t offset, int64_t nrows) {
    const scalar_t* p = xp + offset;
    acc_t* shift = scratch.data() + static_cast<size_t>(tid) * 3 * C;
    acc_t* sum = shift + C;
    acc_t* m2 = sum + C;
    for (int64_t c = 0; c < C; ++c) {
      shift[c] = static_cast<acc_t>(p[c]);
      sum[c] = 0;
      m2[c] = 0;
    }
    for (int64_t r = 0; r < nrows; ++r) {
      const scalar_t* row = p + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        sum[c] += static_cast<acc_t>(row[c]) - shift[c];
      }
    }
    const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(nrows);
    for (int64_t c = 0; c < C; ++c) {
      sum[c] *= inv_rows;  // now the shifted mean
    }
    for (int64_t r = 0; r < nrows; ++r) {
      const scalar_t* row = p + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = (static_cast<acc_t>(row[c]) - shift[c]) - sum[c];
        m2[c] += d * d;
      }
    }
    WelfordStat* part = partial.data() + static_cast<size_t>(tid) * C;
    for (int64_t c = 0; c < C; ++c) {
      part[c].merge(
          nrows, static_cast<double>(shift[c]) + static_cast<double>(sum[c]),
          static_cast<double>(m2[c]));
    }
  };

  parallel_reduce_chunks(L, run, rows);

  acc_t* mean = mean_out.mutable_data_ptr<acc_t>();
  acc_t* var = var_out.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    WelfordStat total;
    for (int t = 0; t < nthreads; ++t) {
      total.merge(partial[static_cast<size_t>(t) * C + c]);
    }
    // An empty batch has no statistics; 0/0 here would leak NaN into the
    // (empty) output's gradients, so report mean 0 and variance 0.
    mean[c] = static_cast<acc_t>(total.n > 0 ? total.mean : 0.0);
    var[c] = static_cast<acc_t>(
        total.n > 0 ? total.m2 / static_cast<double>(total.n) : 0.0);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x) {
  const ChannelLayout L = make_layout(x);
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({L.C}, opts);
  at::Tensor var = at::empty({L.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_batch_stats", [&] {
        batch_stats_impl<scalar_t>(x, L, mean, var);
      });
  return {mean, var};
}

}  // namespace bnext::cpu
