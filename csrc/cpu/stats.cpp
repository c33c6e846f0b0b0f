// Batch statistics in one pass over memory.
//  - Planar runs (a plane of one channel, or a piece of one) are read twice
//    from L1: once for an approximate centre c, once for S1 = sum(x - c) and
//    S2 = sum((x - c)^2) (the corrected two-pass formula, Bjorck 1996), so
//    nothing cancels even when |mean| >> std.
//  - Channels-inner blocks of rows do the same for the thread's first block;
//    later blocks are read once, with S1, S2 about a centre near the
//    thread's mean so far (the shifted-data algorithm).
// Later planar runs, too, are read once about the channel's mean so far.
// Per thread, both paths add into double sums about one centre per channel;
// threads merge with Chan's formula.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "layout.h"
#include "vec_io.h"
#include "welford.h"

namespace bnext::cpu {

namespace {

constexpr int kUnroll = 4;

// Per-channel sums about a fixed origin k (the first chunk's centre):
// a = sum(x - k), b = sum((x - k)^2), in double. A chunk summarised about
// its own centre c moves to k exactly, with no division:
//   sum(x - k) = s1 + n d,  sum((x - k)^2) = s2 + d (2 s1 + n d),  d = c - k,
// so adding a 7x7 plane costs a few multiply-adds instead of a Chan merge
// (two divisions on the plane's critical path, far slower than reading it). b - a^2 / n is formed in double, where (mean - k)^2 / var
// up to the number of chunks costs nothing.
// The float sums s1, s2 lose eps * (chunk mean - c)^2 / var, so each chunk
// is summed about `center`, the channel's mean so far. It is moved after
// chunks 1, 2, 4, 8, ...: a division after every chunk ended each 7x7
// plane's dependency chain (a quarter of the bfloat16 statistics pass in
// a profile), and once a few chunks are in, the mean so far moves by
// far less than a standard deviation.
template <typename acc_t>
struct ShiftedSums {
  int64_t n = 0, chunks = 0;
  double k = 0.0, a = 0.0, b = 0.0;
  acc_t center = 0;

  // `recenter` moves the centre whatever the chunk count.
  void add(int64_t len, acc_t c, double s1, double s2, bool recenter = false) {
    const double cd = static_cast<double>(c);
    if (n == 0) {
      k = cd;
    }
    const double dn = static_cast<double>(len);
    const double d = cd - k;
    a += s1 + dn * d;
    b += s2 + d * (2.0 * s1 + dn * d);
    n += len;
    ++chunks;
    if (recenter || (chunks & (chunks - 1)) == 0) {
      center = static_cast<acc_t>(k + a / static_cast<double>(n));
    }
  }
};

// Adds n values summarised as (k, a, b) to a Welford total.
inline void merge_shifted(WelfordStat& w, int64_t n, double k, double a, double b) {
  if (n == 0) {
    return;
  }
  const double dn = static_cast<double>(n);
  const double m2 = b - a * a / dn;
  // Clamp rounding below zero, but let NaN through: it must reach the
  // running variance of its own channel.
  w.merge(n, k + a / dn, m2 < 0.0 ? 0.0 : m2);
}

// Mean of `len` contiguous elements, approximately (float sums; it is only
// a centre). kUnroll independent accumulators hide the add latency; a single
// chain would be latency-bound at ~1/3 of bandwidth.
template <typename scalar_t>
typename VecIO<scalar_t>::acc_t run_mean(const scalar_t* q, int64_t len) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  constexpr int U = kUnroll;
  constexpr int64_t K = IO::kStep;
  // Independent of the data, so off the critical path.
  const acc_t inv_len = acc_t(1) / static_cast<acc_t>(len);
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
  if (i < len && len >= K) {
    V v[P];
    IO::load(q + len - K, v);
    zero_step_lanes_below<P>(v, K - (len - i));
#pragma GCC unroll 16
    for (int j = 0; j < P; ++j) sum[j] = sum[j] + v[j];
  } else {
    for (; i < len; ++i) tail += static_cast<acc_t>(q[i]);
  }
#pragma GCC unroll 16
  for (int u = 1; u < U * P; ++u) sum[0] = sum[0] + sum[u];
  return (tail + hsum(sum[0])) * inv_len;
}

// s1 += (x - vc), s2 += (x - vc)^2 over elements [i, len) of a run of
// len >= K elements, one vector step at a time; the last step ends at len
// with the lanes already counted zeroed.
template <typename scalar_t>
__attribute__((always_inline)) inline void plane_sums(
    const scalar_t* q,
    int64_t i,
    int64_t len,
    const typename VecIO<scalar_t>::V& vc,
    typename VecIO<scalar_t>::V* s1,
    typename VecIO<scalar_t>::V* s2) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  constexpr int64_t K = IO::kStep;
  for (; i + K <= len; i += K) {
    V v[P];
    IO::load(q + i, v);
#pragma GCC unroll 4
    for (int j = 0; j < P; ++j) {
      const V d = v[j] - vc;
      s1[j] = s1[j] + d;
      s2[j] = at::vec::fmadd(d, d, s2[j]);
    }
  }
  if (i < len) {
    V v[P];
    IO::load(q + len - K, v);
#pragma GCC unroll 4
    for (int j = 0; j < P; ++j) v[j] = v[j] - vc;
    zero_step_lanes_below<P>(v, K - (len - i));
#pragma GCC unroll 4
    for (int j = 0; j < P; ++j) {
      s1[j] = s1[j] + v[j];
      s2[j] = at::vec::fmadd(v[j], v[j], s2[j]);
    }
  }
}

// Adds `len` contiguous elements of one channel to `out`: S1 = sum(x - c),
// S2 = sum((x - c)^2) in one pass. c is the channel's mean so far; for the
// thread's first run of the channel it is the run's own mean, and the run
// is read a second time, from L1 (the corrected two-pass formula).
template <typename scalar_t>
void run_moments(const scalar_t* q, int64_t len, ShiftedSums<typename VecIO<scalar_t>::acc_t>& out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  constexpr int U = kUnroll;
  constexpr int64_t K = IO::kStep;
  const acc_t center = out.n > 0 ? out.center : run_mean(q, len);

  const V vc(center);
  V s1[U * P], s2[U * P];
#pragma GCC unroll 16
  for (int u = 0; u < U * P; ++u) {
    s1[u] = V(acc_t(0));
    s2[u] = V(acc_t(0));
  }
  acc_t t1 = 0, t2 = 0;
  int64_t i = 0;
  for (; i + U * K <= len; i += U * K) {
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
  if (len >= K) {
    plane_sums<scalar_t>(q, i, len, vc, s1, s2);
  } else {
    for (; i < len; ++i) {
      const acc_t d = static_cast<acc_t>(q[i]) - center;
      t1 += d;
      t2 += d * d;
    }
  }
#pragma GCC unroll 16
  for (int u = 1; u < U * P; ++u) {
    s1[0] = s1[0] + s1[u];
    s2[0] = s2[0] + s2[u];
  }
  t1 += hsum(s1[0]);
  t2 += hsum(s2[0]);
  out.add(len, center, static_cast<double>(t1), static_cast<double>(t2));
}

// Small-plane channel blocks (parallel_channel_blocks, layout.h): each
// channel's float vector sums are reduced and added into its ShiftedSums
// every kFlushElems elements per channel (a few dozen float terms per
// lane, as many as a planar run's), which moves the centre each time. The
// first flushes come after 1, 1, 2, 4, ... planes, so a first plane far
// from the channel's mean costs no more accuracy than in the per-plane
// walk (whose centre moves after planes 1, 2, 4, ...; a first plane 300
// std off failed the float32 tolerance when the centre stayed there for 41
// planes).
constexpr int64_t kMaxBlockChannels = 64;
constexpr int64_t kFlushElems = 2048;

// Channels [c0, c1) (at most kMaxBlockChannels) over all N planes of each,
// into out[c - c0]. Needs S >= K.
template <typename scalar_t>
void channel_block_moments(
    const scalar_t* xp,
    const ChannelLayout& L,
    int64_t c0,
    int64_t c1,
    ShiftedSums<typename VecIO<scalar_t>::acc_t>* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  const int64_t S = L.S, C = L.C, B = c1 - c0;
  const int64_t flush_planes = std::max<int64_t>(1, kFlushElems / S);
  acc_t center[kMaxBlockChannels];
  V s1[kMaxBlockChannels][P], s2[kMaxBlockChannels][P];
  for (int64_t j = 0; j < B; ++j) {
#pragma GCC unroll 4
    for (int k = 0; k < P; ++k) {
      s1[j][k] = V(acc_t(0));
      s2[j][k] = V(acc_t(0));
    }
  }
  int64_t pending = 0;  // planes per channel since the last flush
  int64_t interval = 1;  // planes between flushes: 1, 1, 2, 4, ..., flush_planes
  for (int64_t n = 0; n < L.N; ++n) {
    const scalar_t* run = xp + (n * C + c0) * S;
    for (int64_t j = 0; j < B; ++j) {
      const scalar_t* q = run + j * S;
      if (n == 0) {
        center[j] = run_mean(q, S);  // the first plane is read twice, from L1
      }
      plane_sums<scalar_t>(q, 0, S, V(center[j]), s1[j], s2[j]);
    }
    if (++pending == interval || n + 1 == L.N) {
      for (int64_t j = 0; j < B; ++j) {
#pragma GCC unroll 4
        for (int k = 1; k < P; ++k) {
          s1[j][0] = s1[j][0] + s1[j][k];
          s2[j][0] = s2[j][0] + s2[j][k];
        }
        out[j].add(pending * S, center[j], static_cast<double>(hsum(s1[j][0])),
                   static_cast<double>(hsum(s2[j][0])), /*recenter=*/true);
        center[j] = out[j].center;
#pragma GCC unroll 4
        for (int k = 0; k < P; ++k) {
          s1[j][k] = V(acc_t(0));
          s2[j][k] = V(acc_t(0));
        }
      }
      if (n > 0) {
        interval = std::min(flush_planes, 2 * interval);
      }
      pending = 0;
    }
  }
}

// Per-thread state of the channels-inner path: every channel of a thread
// has seen the same rows, so one count serves all channels. Each channel
// keeps double sums a = sum(x - center), b = sum((x - center)^2) about its
// own float `center`, and a block's float sums (a few rows, about the same
// centre) are widened and added in at the end of its tile: a per-block
// Chan merge over all C channels (a division and five arrays each) would
// cost a large share of the pass at many channels. The centre is moved
// to the mean so far after blocks 1, 2, 4, 8, ... (as ShiftedSums does for
// planar chunks), re-basing a and b exactly in double.
template <typename acc_t>
struct RowsPartial {
  int64_t n = 0, blocks = 0;
  std::vector<double> a, b;
  std::vector<acc_t> center;  // the centre the kernels subtract
};

// Moments of channels [c0, c0 + NS * K) over `nrows` rows: a tile of NS
// steps of K channels read row after row, with every accumulator in
// registers.
//   kFirst: the thread's first block. A first pass over the tile (re-read
//           from L1/L2) sets center[c] = the block's mean.
//   else:   center[c] is the thread's mean so far, so the block is read once.
// Adds S1 = sum(x - center) and S2 = sum((x - center)^2) to part.a/b.
template <typename scalar_t, int NS, bool kFirst>
void tile_moments(
    const scalar_t* p,
    int64_t nrows,
    int64_t C,
    int64_t c0,
    RowsPartial<typename VecIO<scalar_t>::acc_t>& part) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  constexpr int NV = NS * P;
  constexpr int64_t K = IO::kStep;
  constexpr int64_t W = V::size();
  acc_t* const kp = part.center.data() + c0;

  V center[NV];
  if constexpr (kFirst) {
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
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      center[v] = sum[v] * inv_rows;
      center[v].store(kp + v * W);
    }
  } else {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) center[v] = V::loadu(kp + v * W);
  }
  V s1[NV], s2[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    s1[v] = V(acc_t(0));
    s2[v] = V(acc_t(0));
  }
  // The same line of the next block (the thread's next rows) is fetched
  // into L2 meanwhile: the tile walk's short runs of many rows at once are
  // more streams than the hardware prefetcher follows.
  const int64_t ahead = nrows * C;
  for (int64_t r = 0; r < nrows; ++r) {
    const scalar_t* row = p + r * C + c0;
#pragma GCC unroll 16
    for (int st = 0; st < NS; ++st) {
      V v[P];
      IO::load(row + st * K, v);
      prefetch_l2(row + st * K, ahead);
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
  for (int v = 0; v < NV; ++v) add_widened(part.a.data(), part.b.data(), c0 + v * W, s1[v], s2[v]);
}

// Channels past the last full step, one at a time (C % K of them).
template <typename scalar_t>
void scalar_channel_moments(
    const scalar_t* p,
    int64_t nrows,
    int64_t C,
    int64_t c,
    bool first,
    RowsPartial<typename VecIO<scalar_t>::acc_t>& part) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  if (first) {
    acc_t sum = 0;
    for (int64_t r = 0; r < nrows; ++r) sum += static_cast<acc_t>(p[r * C + c]);
    part.center[c] = sum / static_cast<acc_t>(nrows);
  }
  const acc_t ctr = part.center[c];
  acc_t t1 = 0, t2 = 0;
  for (int64_t r = 0; r < nrows; ++r) {
    const acc_t d = static_cast<acc_t>(p[r * C + c]) - ctr;
    t1 += d;
    t2 += d * d;
  }
  part.a[c] += static_cast<double>(t1);
  part.b[c] += static_cast<double>(t2);
}

// Moves every centre to the channel's mean so far (as the kernels' acc_t),
// re-basing the sums: with d = new - old,
// sum(x - new) = a - n d and sum((x - new)^2) = b + d (n d - 2 a).
template <typename acc_t>
void recenter(int64_t C, RowsPartial<acc_t>& part) {
  const double n = static_cast<double>(part.n);
  for (int64_t c = 0; c < C; ++c) {
    const double old_c = static_cast<double>(part.center[c]);
    const acc_t next = static_cast<acc_t>(old_c + part.a[c] / n);
    const double d = static_cast<double>(next) - old_c;
    part.b[c] += d * (n * d - 2.0 * part.a[c]);
    part.a[c] -= n * d;
    part.center[c] = next;
  }
}

// Adds a block of `nrows` full rows of C channels to `part`, channels in
// register tiles (see tile_moments).
template <typename scalar_t>
void rows_moments(
    const scalar_t* p,
    int64_t nrows,
    int64_t C,
    RowsPartial<typename VecIO<scalar_t>::acc_t>& part) {
  using IO = VecIO<scalar_t>;
  constexpr int64_t K = IO::kStep;
  constexpr int kTileSteps = 4 / IO::kParts;  // 4 accumulation vectors per tile
  auto tiles = [&](auto first) {
    constexpr bool kFirst = decltype(first)::value;
    int64_t c0 = 0;
    for (; c0 + kTileSteps * K <= C; c0 += kTileSteps * K) {
      tile_moments<scalar_t, kTileSteps, kFirst>(p, nrows, C, c0, part);
    }
    for (; c0 + K <= C; c0 += K) {
      tile_moments<scalar_t, 1, kFirst>(p, nrows, C, c0, part);
    }
    for (; c0 < C; ++c0) {
      scalar_channel_moments(p, nrows, C, c0, kFirst, part);
    }
  };
  if (part.n == 0) {
    tiles(std::true_type{});
  } else {
    tiles(std::false_type{});
  }
  part.n += nrows;
  ++part.blocks;
  if ((part.blocks & (part.blocks - 1)) == 0) {
    recenter(C, part);
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
  // Planar path: one ShiftedSums per (thread, channel). Channels-inner
  // path: one RowsPartial per thread.
  std::vector<ShiftedSums<acc_t>> partial(
      L.channels_inner ? 0 : static_cast<size_t>(nthreads) * C);
  std::vector<RowsPartial<acc_t>> rows_partial(L.channels_inner ? nthreads : 0);
  for (auto& rp : rows_partial) {
    rp.a.assign(C, 0.0);
    rp.b.assign(C, 0.0);
    rp.center.assign(C, acc_t(0));
  }

  // Each channel is summed by one task, into thread slot 0. The forward's
  // normalization reads x again and writes y: two tensors.
  const bool channel_blocks = parallel_channel_blocks(
      L, sizeof(scalar_t), VecIO<scalar_t>::kStep, kMaxBlockChannels, /*tensors=*/2,
      [&](int /*tid*/, int64_t c0, int64_t c1) {
        channel_block_moments(xp, L, c0, c1, partial.data() + c0);
      });
  if (!channel_blocks) {
    parallel_reduce_chunks(
        L,
        [&](int tid, int64_t c, int64_t offset, int64_t len) {
          run_moments(xp + offset, len, partial[static_cast<size_t>(tid) * C + c]);
        },
        [&](int tid, int64_t offset, int64_t nrows) {
          rows_moments(xp + offset, nrows, C, rows_partial[tid]);
        },
        reduce_block_rows(C, sizeof(scalar_t)));
  }

  double* mean = mean_out.mutable_data_ptr<double>();
  acc_t* var = var_out.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    WelfordStat total;
    for (int t = 0; t < nthreads; ++t) {
      if (L.channels_inner) {
        const RowsPartial<acc_t>& rp = rows_partial[t];
        merge_shifted(total, rp.n, static_cast<double>(rp.center[c]), rp.a[c], rp.b[c]);
      } else {
        const ShiftedSums<acc_t>& s = partial[static_cast<size_t>(t) * C + c];
        merge_shifted(total, s.n, s.k, s.a, s.b);
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
