// Batch statistics in one pass over memory. Each chunk (a run of one
// channel, or a block of rows) is small enough to be read twice from L1/L2:
// once for an approximate centre c, once for S1 = sum(x - c) and
// S2 = sum((x - c)^2). The chunk's exact M2 is S2 - S1^2 / n (the corrected
// two-pass formula, Bjorck 1996): c is within rounding of the chunk mean,
// so nothing cancels even when |mean| >> std. Chunks then merge with Chan's
// parallel Welford formula in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "layout.h"
#include "vec_io.h"
#include "welford.h"

namespace bnext::cpu {

namespace {

// Summary of one chunk relative to its centre.
struct ChunkMoments {
  double center, s1, s2;
  void merge_into(WelfordStat& w, int64_t n) const {
    const double dn = static_cast<double>(n);
    const double m2 = s2 - s1 * s1 / dn;
    // Clamp rounding below zero, but let NaN through: it must reach the
    // running variance of its own channel.
    w.merge(n, center + s1 / dn, m2 < 0.0 ? 0.0 : m2);
  }
};

// Contiguous run of one channel.
template <typename scalar_t>
ChunkMoments run_moments(const scalar_t* p, int64_t len) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  constexpr int64_t K = IO::kStep;

  V sum[P];
  for (int j = 0; j < P; ++j) sum[j] = V(acc_t(0));
  int64_t i = 0;
  for (; i + K <= len; i += K) {
    V v[P];
    IO::load(p + i, v);
    for (int j = 0; j < P; ++j) sum[j] = sum[j] + v[j];
  }
  acc_t total = 0;
  for (int j = 0; j < P; ++j) total += hsum(sum[j]);
  for (; i < len; ++i) total += static_cast<acc_t>(p[i]);
  const acc_t center = total / static_cast<acc_t>(len);

  const V vc(center);
  V s1[P], s2[P];
  for (int j = 0; j < P; ++j) {
    s1[j] = V(acc_t(0));
    s2[j] = V(acc_t(0));
  }
  for (i = 0; i + K <= len; i += K) {
    V v[P];
    IO::load(p + i, v);
    for (int j = 0; j < P; ++j) {
      const V d = v[j] - vc;
      s1[j] = s1[j] + d;
      s2[j] = at::vec::fmadd(d, d, s2[j]);
    }
  }
  acc_t t1 = 0, t2 = 0;
  for (int j = 0; j < P; ++j) {
    t1 += hsum(s1[j]);
    t2 += hsum(s2[j]);
  }
  for (; i < len; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - center;
    t1 += d;
    t2 += d * d;
  }
  return {static_cast<double>(center), static_cast<double>(t1), static_cast<double>(t2)};
}

// Block of `nrows` rows of C channels. Column blocks of K channels are the
// outer loop so the accumulators live in registers across the rows.
template <typename scalar_t>
void rows_moments(
    const scalar_t* p,
    int64_t nrows,
    int64_t C,
    WelfordStat* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  constexpr int64_t K = IO::kStep;
  const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(nrows);

  int64_t c0 = 0;
  for (; c0 + K <= C; c0 += K) {
    V sum[P];
    for (int j = 0; j < P; ++j) sum[j] = V(acc_t(0));
    for (int64_t r = 0; r < nrows; ++r) {
      V v[P];
      IO::load(p + r * C + c0, v);
      for (int j = 0; j < P; ++j) sum[j] = sum[j] + v[j];
    }
    V center[P], s1[P], s2[P];
    for (int j = 0; j < P; ++j) {
      center[j] = sum[j] * V(inv_rows);
      s1[j] = V(acc_t(0));
      s2[j] = V(acc_t(0));
    }
    for (int64_t r = 0; r < nrows; ++r) {
      V v[P];
      IO::load(p + r * C + c0, v);
      for (int j = 0; j < P; ++j) {
        const V d = v[j] - center[j];
        s1[j] = s1[j] + d;
        s2[j] = at::vec::fmadd(d, d, s2[j]);
      }
    }
    alignas(64) acc_t cb[K], b1[K], b2[K];
    for (int j = 0; j < P; ++j) {
      center[j].store(cb + j * V::size());
      s1[j].store(b1 + j * V::size());
      s2[j].store(b2 + j * V::size());
    }
    for (int64_t k = 0; k < K; ++k) {
      ChunkMoments{cb[k], b1[k], b2[k]}.merge_into(out[c0 + k], nrows);
    }
  }
  for (; c0 < C; ++c0) {  // channel tail, scalar
    acc_t sum = 0;
    for (int64_t r = 0; r < nrows; ++r) sum += static_cast<acc_t>(p[r * C + c0]);
    const acc_t center = sum * inv_rows;
    acc_t s1 = 0, s2 = 0;
    for (int64_t r = 0; r < nrows; ++r) {
      const acc_t d = static_cast<acc_t>(p[r * C + c0]) - center;
      s1 += d;
      s2 += d * d;
    }
    ChunkMoments{center, s1, s2}.merge_into(out[c0], nrows);
  }
}

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

  parallel_reduce_chunks(
      L,
      [&](int tid, int64_t c, int64_t offset, int64_t len) {
        run_moments(xp + offset, len)
            .merge_into(partial[static_cast<size_t>(tid) * C + c], len);
      },
      [&](int tid, int64_t offset, int64_t nrows) {
        rows_moments(
            xp + offset, nrows, C, partial.data() + static_cast<size_t>(tid) * C);
      });

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
