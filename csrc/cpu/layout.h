// The two parallel CPU drivers (reduction and elementwise) every kernel is
// built from, over the planar / channels-inner layouts of channel_layout.h.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "../channel_layout.h"
#include "cache_policy.h"
#include "vec_io.h"

namespace bnext::cpu {

// Elements one reduction chunk covers: small enough that a chunk read twice
// (two-pass chunk statistics) is served from L1/L2 the second time, large
// enough that per-chunk bookkeeping (merges, horizontal sums) is noise.
constexpr int64_t kChunkElems = 8192;
// Channels-inner chunks: rows * C elements, at least kMinBlockRows rows.
constexpr int64_t kRowChunkElems = 32768;
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kMaxBlockRows = 256;
// Blocks of many channels: the statistics tiles walk a block column by
// column, and rows 1-4 KB apart map to the same few L1 sets, so 32 rows of
// 1024 float32 channels evict their own prefetched lines. From 512
// channels, blocks are capped at 32 KB; narrower rows keep the larger
// blocks, and fewer than 16 bfloat16 rows cost more in merges than they save.
constexpr int64_t kManyChannels = 512;
constexpr int64_t kManyChannelsBlockBytes = 32768;
constexpr int64_t kManyChannelsRowBytes = 32;  // min rows = this / elem_bytes
constexpr int64_t kManyChannelsMaxRows = 16;

// Rows per channels-inner reduction block, for elements of elem_bytes.
inline int64_t reduce_block_rows(int64_t C, int64_t elem_bytes) {
  if (C >= kManyChannels) {
    return std::clamp<int64_t>(
        kManyChannelsBlockBytes / (C * elem_bytes), kManyChannelsRowBytes / elem_bytes,
        kManyChannelsMaxRows);
  }
  // C == 0 (an input with no channels, hence no elements) must not divide.
  return std::clamp<int64_t>(kRowChunkElems / std::max<int64_t>(C, 1), kMinBlockRows, kMaxBlockRows);
}

// Below this many elements per task, threads cost more than they save.
constexpr int64_t kGrainElems = 32768;

// Reduction driver. Every thread gets its own slot `tid` in
// [0, at::get_num_threads()), so per-thread partial results need no locks
// and the combine order is fixed (deterministic for a given thread count).
//   planar:          run(tid, c, offset, len) - `len` contiguous elements of
//                    channel c: one plane, or a kChunkElems piece of one,
//                    visited in memory order.
//   channels-inner:  rows(tid, offset, nrows) - nrows full rows of C
//                    channels, block_rows of them except in the last
//                    block (reduce_block_rows, unless the caller's walk
//                    wants other blocks).
template <typename RunFn, typename RowsFn>
void parallel_reduce_chunks(
    const ChannelLayout& L, RunFn&& run, RowsFn&& rows, int64_t block_rows) {
  if (L.N == 0 || L.S == 0 || L.C == 0) {
    return;
  }
  if (!L.channels_inner) {
    // Tasks in memory order: plane p = n * C + c, split into chunks of at
    // most kChunkElems. Walking channel by channel instead would jump
    // C * S elements between the N planes of a channel and defeat the
    // hardware prefetcher.
    const int64_t per_plane = (L.S + kChunkElems - 1) / kChunkElems;
    const int64_t chunk = std::min(L.S, kChunkElems);
    const int64_t tasks = L.N * L.C * per_plane;
    const int64_t grain = std::max<int64_t>(1, kGrainElems / chunk);
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      const int tid = at::get_thread_num();
      int64_t k = begin % per_plane;
      int64_t p = begin / per_plane;
      int64_t c = p % L.C;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t start = k * kChunkElems;
        run(tid, c, p * L.S + start, std::min(kChunkElems, L.S - start));
        if (++k == per_plane) {
          k = 0;
          ++p;
          if (++c == L.C) {
            c = 0;
          }
        }
      }
    });
  } else {
    const int64_t block = block_rows;
    const int64_t blocks = (L.rows() + block - 1) / block;
    const int64_t grain = std::max<int64_t>(1, kGrainElems / (block * L.C));
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      const int tid = at::get_thread_num();
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r0 = b * block;
        const int64_t nrows = std::min(block, L.rows() - r0);
        rows(tid, r0 * L.C, nrows);
      }
    });
  }
}

// Small planes (7x7, 14x14): summing each plane on its own costs two
// horizontal sums and a double update per 49 elements, more than half of
// a bfloat16 statistics pass in a profile. There, the reductions can take
// a block of channels over the whole batch per task instead: for each n,
// the block's planes are one contiguous run (kBlockRunBytes, long enough
// for the prefetcher), and each channel's vector sums stay in a stack
// array until they are reduced every few dozen elements or at the end. A
// channel is summed in one task, in a fixed order, so its result does not
// depend on the thread count.
// Only while the `tensors` tensors of the input's size that the pass and
// the one after it touch fit the last-level cache: out of it, a block's
// runs spaced C * S apart are slower than the memory-order walk. The cache
// here is the sysfs size, not the smaller usable one (fits_usable_cache):
// this walk still wins between the two.
constexpr int64_t kSmallPlaneElems = 256;
constexpr int64_t kBlockRunBytes = 8192;

// Runs block(tid, c0, c1) over channel blocks of at most max_channels and
// returns true where the walk applies (planar, step <= S <=
// kSmallPlaneElems, at least 8 channels per thread, in cache); else false.
// At least 4 blocks per thread.
template <typename BlockFn>
bool parallel_channel_blocks(
    const ChannelLayout& L, int64_t elem_bytes, int64_t step, int64_t max_channels,
    int tensors, BlockFn&& block) {
  const int nthreads = at::get_num_threads();
  const int64_t C = L.C;
  if (L.channels_inner || L.N == 0 || L.S < step || L.S > kSmallPlaneElems ||
      C < 8 * nthreads || !fits_last_level_cache(tensors * L.N * C * L.S * elem_bytes)) {
    return false;
  }
  const int64_t by_bytes = std::max<int64_t>(1, kBlockRunBytes / (L.S * elem_bytes));
  const int64_t tasks = std::min<int64_t>(
      C, std::max<int64_t>({(C + by_bytes - 1) / by_bytes, (C + max_channels - 1) / max_channels,
                            int64_t{4} * nthreads}));
  const int64_t size = (C + tasks - 1) / tasks;
  at::parallel_for(0, (C + size - 1) / size, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    for (int64_t t = begin; t < end; ++t) {
      block(tid, t * size, std::min(C, (t + 1) * size));
    }
  });
  return true;
}

// Elementwise driver with two shapes of work:
//   planar:          planes(begin, end) - planes [begin, end), plane p
//                    being channel p % C at offset p * S; a task's whole
//                    range in one call, so per-plane setup the kernel can
//                    hoist (constants, pointer copies) is paid per task
//   channels-inner:  rows(offset, nrows)
// With `fence`, every task ends with a store fence (its streaming stores
// are then visible to whoever reads after the parallel region).
template <typename PlanesFn, typename RowsFn>
void parallel_elementwise(
    const ChannelLayout& L, PlanesFn&& planes, RowsFn&& rows, bool fence = false) {
  if (L.N == 0 || L.S == 0 || L.C == 0) {
    return;
  }
  if (!L.channels_inner) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / L.S);
    at::parallel_for(0, L.N * L.C, grain, [&](int64_t begin, int64_t end) {
      planes(begin, end);
      if (fence) {
        stream_fence();
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / L.C);
    at::parallel_for(0, L.rows(), grain, [&](int64_t begin, int64_t end) {
      rows(begin * L.C, end - begin);
      if (fence) {
        stream_fence();
      }
    });
  }
}

}  // namespace bnext::cpu
