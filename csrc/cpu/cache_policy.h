// Cache-size decisions: when an elementwise pass should write its output
// with streaming (non-temporal) stores, and whether a pass's tensors stay
// in the last-level cache.
#pragma once
#include <cstdint>

namespace bnext::cpu {

// True when a pass that reads and writes `pass_bytes` in all should write
// its output with streaming stores: when it would not keep the output in
// the last-level cache anyway, and for channels-inner rows of at least
// kWideRowBytes from half that size (cache_policy.cpp). The cache is the
// size sysfs lists, or a quarter of a probe pass where streaming measured
// faster at that pass (store_probe.h), once per process.
// The choice can be forced (Tuning::StreamingStores).
constexpr int64_t kWideRowBytes = 2048;
bool stream_stores(int64_t pass_bytes, bool wide_rows);

// True when `bytes` fit the last-level cache (sysfs size of cpu0's highest
// cache level).
bool fits_last_level_cache(int64_t bytes);

// True when `bytes` fit the cache this process can use: the sysfs size, or
// the smaller size stream_stores takes where the probe found streaming
// faster (runs the probe on first need, once per process).
bool fits_usable_cache(int64_t bytes);

// Forced memory-traffic choices, for tests and measurements: -1 automatic
// (the default), 0 off, 1 on. Each level library keeps its own, first read
// from BNEXT_STREAMING_STORES / BNEXT_RESIDENT; bnext.set_cpu_tuning changes
// the loaded level's in-process through the op table.
enum class Tuning : int { StreamingStores = 0, Resident = 1 };
int forced_choice(Tuning which);
void set_forced_choice(Tuning which, int value);

}  // namespace bnext::cpu
