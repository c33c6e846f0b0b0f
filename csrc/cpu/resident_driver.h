// Planar kernels of two passes over the same inputs (a per-channel
// reduction, then an elementwise pass that needs its result), walked one
// block of channels at a time: the block is reduced over the whole batch,
// its coefficients computed, and its elementwise pass run at once, while
// the block's planes are still in the core's caches. The inputs then come
// from memory once instead of twice.
//
// Used by the training backward (backward.cpp) for inputs that do not fit
// the usable cache; in cache the memory-order passes are faster. The
// training forward gained nothing from the same walk and keeps two passes.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>

#include "cache_policy.h"
#include "layout.h"
#include "step_drivers.h"

namespace bnext::cpu {

// Input bytes per thread a block may span (its planes over the whole batch,
// every input tensor counted). Larger than a core's L2 because an L3 filled
// by L2 evictions (as Zen's) still serves what the reduction pushed out of
// L2, without a trip to memory.
constexpr int64_t kResidentBytes = int64_t{4} << 20;
// Channels per block at most (the block's sums live on the stack).
constexpr int64_t kResidentMaxChannels = 64;
// Planes below a few vectors are left to parallel_channel_blocks and the
// memory-order walks: their short runs lose more to the block walk than the
// second trip to memory costs.
constexpr int64_t kResidentMinPlaneBytes = 2048;

// Channels per block of the resident walk for `reads` input tensors of
// elem_bytes elements, or 0 where it does not apply: channels-inner, planes
// under kResidentMinPlaneBytes, a channel over kResidentBytes, fewer than
// 4 channels per thread, or an input that fits the usable cache
// (fits_usable_cache: the probed size, not sysfs's, which on some VMs is
// far more than the guest gets).
// Tuning::Resident forces the choice where the layout allows it (for
// testing and benchmarking both walks).
inline int64_t resident_block_channels(const ChannelLayout& L, int64_t elem_bytes, int reads) {
  const int forced = forced_choice(Tuning::Resident);
  const int64_t channel_bytes = reads * L.N * L.S * elem_bytes;
  const int nthreads = at::get_num_threads();
  if (forced == 0 || L.channels_inner || L.N == 0 || L.C < 4 * nthreads ||
      L.S * elem_bytes < kResidentMinPlaneBytes || channel_bytes > kResidentBytes ||
      (forced != 1 && fits_usable_cache(L.N * L.C * L.S * elem_bytes))) {
    return 0;
  }
  return std::clamp<int64_t>(
      kResidentBytes / channel_bytes, 1,
      std::min<int64_t>(kResidentMaxChannels, L.C / (4 * nthreads)));
}

// The resident walk over blocks of `block` channels (a nonzero
// resident_block_channels, which the caller checks first so that it
// allocates nothing for a walk that does not apply).
//   reduce_block(c0, c1): reads channels [c0, c1) over the whole batch and
//     writes what ecoefs reads for them;
//   elementwise_step(i, n, set, stream): as in elementwise_steps, with
//     ecoefs, over the same channels right after.
// A channel is reduced in one task: its result does not depend on the
// thread count.
template <int64_t K, typename BlockFn, typename ECoefs, typename EStep>
void resident_channel_blocks(
    const ChannelLayout& L,
    int64_t block,
    BlockFn&& reduce_block,
    const ECoefs& ecoefs,
    StepOutput out,
    EStep&& elementwise_step) {
  const int64_t C = L.C, S = L.S;
  // Channels split evenly over the threads, then cut into blocks: whole
  // blocks dealt out would leave one thread a block more than the other
  // (13 blocks of 10 at 128 channels).
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    const ECoefs ec = ecoefs;  // local copies: see elementwise_steps
    auto estep = elementwise_step;
    for (int64_t c0 = begin; c0 < end; c0 += block) {
      const int64_t c1 = std::min(end, c0 + block);
      reduce_block(c0, c1);
      for (int64_t n = 0; n < L.N; ++n) {
        for (int64_t c = c0; c < c1; ++c) {
          typename ECoefs::Set s;
          ec.broadcast(c, s);
          plane_steps<K>(estep, s, (n * C + c) * S, S, out.stream);
        }
      }
    }
    if (out.stream) {
      stream_fence();
    }
  });
}

// reduce_steps' sums for channels [c0, c1) (at most kResidentMaxChannels),
// planar, in memory order over the batch, pieces cut as
// parallel_reduce_chunks cuts planes: sum_g[c - c0], sum_gt[c - c0].
template <typename IO, typename Coefs, typename Step>
void block_pair_sums(
    const ChannelLayout& L, const Coefs& coefs, const Step& step, int64_t c0, int64_t c1,
    double* sum_g, double* sum_gt) {
  const Coefs coefs_l = coefs;  // local copies: see elementwise_steps
  auto step_l = step;
  std::fill(sum_g, sum_g + (c1 - c0), 0.0);
  std::fill(sum_gt, sum_gt + (c1 - c0), 0.0);
  for (int64_t n = 0; n < L.N; ++n) {
    for (int64_t c = c0; c < c1; ++c) {
      typename Coefs::Set s;
      coefs_l.broadcast(c, s);
      const int64_t plane = (n * L.C + c) * L.S;
      for (int64_t i = 0; i < L.S; i += kChunkElems) {
        const auto [g, gt] =
            run_pair_sums<IO>(step_l, s, plane + i, std::min(kChunkElems, L.S - i));
        sum_g[c - c0] += g;
        sum_gt[c - c0] += gt;
      }
    }
  }
}

}  // namespace bnext::cpu
