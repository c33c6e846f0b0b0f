// A one-time measurement of whether streaming stores pay off at a given
// pass size on this machine (see cache_policy.cpp for why the cache size
// alone does not tell).
#pragma once
#include <cstdint>

namespace bnext::cpu {

// Times an eval-like pass (y = x * a + b, float32, all threads) that reads
// and writes `pass_bytes` in all, with normal and with streaming stores,
// interleaved, best of three each; true when streaming was at least
// kStreamingWinRatio times as fast.
constexpr double kStreamingWinRatio = 1.15;
bool streaming_wins_at(int64_t pass_bytes);

}  // namespace bnext::cpu
