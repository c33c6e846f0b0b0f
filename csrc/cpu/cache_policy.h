// When an elementwise pass should write its output with streaming
// (non-temporal) stores.
#pragma once
#include <cstdint>

namespace bnext::cpu {

// True when a pass that reads and writes `pass_bytes` in all would not keep
// its output in the last-level cache anyway. BNEXT_STREAMING_STORES=0 or 1
// forces the choice (for benchmarking both).
bool stream_stores(int64_t pass_bytes);

}  // namespace bnext::cpu
