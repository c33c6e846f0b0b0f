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

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "layout.h"
#include "vec_io.h"
#include "welford.h"

namespace bnext::cpu {

namespace {

constexpr int kUnroll = 4;

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

// `len` contiguous elements of one channel. kUnroll independent
// accumulators per pass hide the add/FMA latency; a single chain would be
// latency-bound at ~1/3 of bandwidth.
template <typename scalar_t>
ChunkMoments run_moments(const scalar_t* q, int64_t len) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  constexpr int U = kUnroll;
  constexpr int64_t K = IO::kStep;

  V sum[U * P];
  for (auto& v : sum) v = V(acc_t(0));
  acc_t tail = 0;
  int64_t i = 0;
  for (; i + U * K <= len; i += U * K) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      V v[P];
      IO::load(q + i + u * K, v);
#pragma GCC unroll 16
      for (int j = 0; j < P; ++j) sum[u * P + j] = sum[u * P + j] + v[j];
    }
  }
  for (; i + K <= len; i += K) {
    V v[P];
    IO::load(q + i, v);
#pragma GCC unroll 16
    for (int j = 0; j < P; ++j) sum[j] = sum[j] + v[j];
  }
  for (; i < len; ++i) tail += static_cast<acc_t>(q[i]);
#pragma GCC unroll 16
  for (int u = 1; u < U * P; ++u) sum[0] = sum[0] + sum[u];
  tail += hsum(sum[0]);
  const acc_t center = tail / static_cast<acc_t>(len);

  const V vc(center);
  V s1[U * P], s2[U * P];
#pragma GCC unroll 16
  for (int u = 0; u < U * P; ++u) {
    s1[u] = V(acc_t(0));
    s2[u] = V(acc_t(0));
  }
  acc_t t1 = 0, t2 = 0;
  for (i = 0; i + U * K <= len; i += U * K) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      V v[P];
      IO::load(q + i + u * K, v);
#pragma GCC unroll 16
      for (int j = 0; j < P; ++j) {
        const V d = v[j] - vc;
        s1[u * P + j] = s1[u * P + j] + d;
        s2[u * P + j] = at::vec::fmadd(d, d, s2[u * P + j]);
      }
    }
  }
  for (; i + K <= len; i += K) {
    V v[P];
    IO::load(q + i, v);
#pragma GCC unroll 16
    for (int j = 0; j < P; ++j) {
      const V d = v[j] - vc;
      s1[j] = s1[j] + d;
      s2[j] = at::vec::fmadd(d, d, s2[j]);
    }
  }
  for (; i < len; ++i) {
    const acc_t d = static_cast<acc_t>(q[i]) - center;
    t1 += d;
    t2 += d * d;
  }
#pragma GCC unroll 16
  for (int u = 1; u < U * P; ++u) {
    s1[0] = s1[0] + s1[u];
    s2[0] = s2[0] + s2[u];
  }
  t1 += hsum(s1[0]);
  t2 += hsum(s2[0]);
  return {static_cast<double>(center), static_cast<double>(t1), static_cast<double>(t2)};
}

// Per-thread state of the channels-inner path. Every channel of a thread has
// seen the same rows, so one count serves all channels and the Chan merge is
// a plain vectorisable loop over C.
struct RowsPartial {
  int64_t n = 0;
  std::vector<double> mean, m2;
};

// Moments of channels [c0, c0 + NS * K) over `nrows` rows, accumulated in
// registers: NS steps of K channels per row, i.e. a tile of NS * K adjacent
// channels (128 bytes of float32 for NS * K = 32) read row after row.
// Writes the tile's centre, S1 and S2 to the scratch arrays.
template <typename scalar_t, int NS>
void tile_moments(
    const scalar_t* p,
    int64_t nrows,
    int64_t C,
    int64_t c0,
    typename VecIO<scalar_t>::acc_t* center_out,
    typename VecIO<scalar_t>::acc_t* s1_out,
    typename VecIO<scalar_t>::acc_t* s2_out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  constexpr int NV = NS * P;
  constexpr int64_t K = IO::kStep;
  constexpr int64_t W = V::size();

  V sum[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) sum[v] = V(acc_t(0));
  for (int64_t r = 0; r < nrows; ++r) {
    const scalar_t* row = p + r * C + c0;
#pragma GCC unroll 16
    for (int st = 0; st < NS; ++st) {
      V v[P];
      IO::load(row + st * K, v);
#pragma GCC unroll 16
      for (int j = 0; j < P; ++j) sum[st * P + j] = sum[st * P + j] + v[j];
    }
  }
  const V inv_rows(acc_t(1) / static_cast<acc_t>(nrows));
  V center[NV], s1[NV], s2[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    center[v] = sum[v] * inv_rows;
    s1[v] = V(acc_t(0));
    s2[v] = V(acc_t(0));
  }
  for (int64_t r = 0; r < nrows; ++r) {
    const scalar_t* row = p + r * C + c0;
#pragma GCC unroll 16
    for (int st = 0; st < NS; ++st) {
      V v[P];
      IO::load(row + st * K, v);
#pragma GCC unroll 16
      for (int j = 0; j < P; ++j) {
        const int i = st * P + j;
        const V d = v[j] - center[i];
        s1[i] = s1[i] + d;
        s2[i] = at::vec::fmadd(d, d, s2[i]);
      }
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    center[v].store(center_out + c0 + v * W);
    s1[v].store(s1_out + c0 + v * W);
    s2[v].store(s2_out + c0 + v * W);
  }
}

// Chan-merges a block summarised as (centre, S1, S2) per channel into the
// thread's state. All channels share the block's row count, so this is a
// plain loop over C.
template <typename acc_t>
void merge_block(
    int64_t nrows,
    int64_t C,
    const acc_t* center,
    const acc_t* s1,
    const acc_t* s2,
    RowsPartial& part) {
  const double nb = static_cast<double>(nrows);
  const double na = static_cast<double>(part.n);
  const double wb = nb / (na + nb);
  double* mean = part.mean.data();
  double* m2 = part.m2.data();
  for (int64_t c = 0; c < C; ++c) {
    const double d1 = s1[c];
    const double mean_b = static_cast<double>(center[c]) + d1 / nb;
    const double raw = static_cast<double>(s2[c]) - d1 * d1 / nb;
    const double m2_b = raw < 0.0 ? 0.0 : raw;  // NaN passes
    const double delta = mean_b - mean[c];
    mean[c] += delta * wb;
    m2[c] += m2_b + delta * delta * na * wb;
  }
  part.n += nrows;
}

// S1 = sum(x - centre), S2 = sum((x - centre)^2) over `nrows` rows in one
// pass in memory order, centre = the thread's current mean.
template <typename scalar_t>
void shifted_rows_moments(
    const scalar_t* p,
    int64_t nrows,
    int64_t C,
    const RowsPartial& part,
    typename VecIO<scalar_t>::acc_t* center,
    typename VecIO<scalar_t>::acc_t* s1,
    typename VecIO<scalar_t>::acc_t* s2) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  constexpr int64_t K = IO::kStep;
  constexpr int64_t W = V::size();
  for (int64_t c = 0; c < C; ++c) {
    center[c] = static_cast<acc_t>(part.mean[c]);
    s1[c] = 0;
    s2[c] = 0;
  }
  for (int64_t r = 0; r < nrows; ++r) {
    const scalar_t* row = p + r * C;
    int64_t c = 0;
    for (; c + K <= C; c += K) {
      V v[P];
      IO::load(row + c, v);
#pragma GCC unroll 16
      for (int j = 0; j < P; ++j) {
        const int64_t cj = c + j * W;
        const V d = v[j] - V::loadu(center + cj);
        (V::loadu(s1 + cj) + d).store(s1 + cj);
        at::vec::fmadd(d, d, V::loadu(s2 + cj)).store(s2 + cj);
      }
    }
    for (; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(row[c]) - center[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

// Adds a block of `nrows` rows of C channels to `part`. `scratch` holds
// 3 * C acc_t. Channels go in register tiles (see tile_moments); the block's
// second read comes from L1/L2.
template <typename scalar_t>
void rows_moments(
    const scalar_t* p,
    int64_t nrows,
    int64_t C,
    typename VecIO<scalar_t>::acc_t* scratch,
    RowsPartial& part) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  constexpr int64_t K = IO::kStep;
  constexpr int kTileSteps = 4 / IO::kParts;  // 4 accumulation vectors per tile
  acc_t* center = scratch;
  acc_t* s1 = scratch + C;
  acc_t* s2 = scratch + 2 * C;

  if (part.n > 0) {
    // The thread's statistics so far give a centre within ~std/4 of the
    // channel mean, so one streaming pass of shifted sums (no re-read, rows
    // in memory order) loses nothing to cancellation.
    shifted_rows_moments(p, nrows, C, part, center, s1, s2);
    merge_block(nrows, C, center, s1, s2, part);
    return;
  }
  int64_t c0 = 0;
  for (; c0 + kTileSteps * K <= C; c0 += kTileSteps * K) {
    tile_moments<scalar_t, kTileSteps>(p, nrows, C, c0, center, s1, s2);
  }
  for (; c0 + K <= C; c0 += K) {
    tile_moments<scalar_t, 1>(p, nrows, C, c0, center, s1, s2);
  }
  for (; c0 < C; ++c0) {  // channel tail, scalar
    acc_t sum = 0;
    for (int64_t r = 0; r < nrows; ++r) sum += static_cast<acc_t>(p[r * C + c0]);
    const acc_t ctr = sum / static_cast<acc_t>(nrows);
    acc_t t1 = 0, t2 = 0;
    for (int64_t r = 0; r < nrows; ++r) {
      const acc_t d = static_cast<acc_t>(p[r * C + c0]) - ctr;
      t1 += d;
      t2 += d * d;
    }
    center[c0] = ctr;
    s1[c0] = t1;
    s2[c0] = t2;
  }

  merge_block(nrows, C, center, s1, s2, part);
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
  // Planar path: one WelfordStat per (thread, channel). Channels-inner path:
  // one RowsPartial per thread plus 3 * C scratch values.
  std::vector<WelfordStat> partial(L.channels_inner ? 0 : static_cast<size_t>(nthreads) * C);
  std::vector<RowsPartial> rows_partial(L.channels_inner ? nthreads : 0);
  std::vector<acc_t> scratch(L.channels_inner ? static_cast<size_t>(nthreads) * 3 * C : 0);
  for (auto& rp : rows_partial) {
    rp.mean.assign(C, 0.0);
    rp.m2.assign(C, 0.0);
  }

  parallel_reduce_chunks(
      L,
      [&](int tid, int64_t c, int64_t offset, int64_t len) {
        run_moments(xp + offset, len)
            .merge_into(partial[static_cast<size_t>(tid) * C + c], len);
      },
      [&](int tid, int64_t offset, int64_t nrows) {
        rows_moments(xp + offset, nrows, C,
                     scratch.data() + static_cast<size_t>(tid) * 3 * C, rows_partial[tid]);
      });

  double* mean = mean_out.mutable_data_ptr<double>();
  acc_t* var = var_out.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    WelfordStat total;
    for (int t = 0; t < nthreads; ++t) {
      if (L.channels_inner) {
        const RowsPartial& rp = rows_partial[t];
        total.merge(rp.n, rp.mean[c], rp.m2[c]);
      } else {
        total.merge(partial[static_cast<size_t>(t) * C + c]);
      }
    }
    // An empty batch has no statistics; 0/0 here would leak NaN into the
    // (empty) output's gradients, so report mean 0 and variance 0.
    mean[c] = total.n > 0 ? total.mean : 0.0;
    var[c] = static_cast<acc_t>(
        total.n > 0 ? total.m2 / static_cast<double>(total.n) : 0.0);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x) {
  const ChannelLayout L = make_layout(x);
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({L.C}, opts.dtype(at::kDouble));
  at::Tensor var = at::empty({L.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_batch_stats", [&] {
        batch_stats_impl<scalar_t>(x, L, mean, var);
      });
  return {mean, var};
}

}  // namespace bnext::cpu
