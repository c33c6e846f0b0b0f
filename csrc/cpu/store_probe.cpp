#include "store_probe.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <chrono>

#include "vec_io.h"

namespace bnext::cpu {

namespace {

// Elements per parallel work item: 64 KB of floats, whole cache lines, so
// streaming stores never share a line between threads.
constexpr int64_t kChunk = 16384;

// One pass over n floats (n a multiple of the chunk), split like the
// kernels' own passes: chunks of whole lines, across every thread.
double pass_seconds(const float* x, float* y, int64_t n, bool stream) {
  using V = Vectorized<float>;
  const V a(1.0009765625f), b(0.5f);
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, n / kChunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * kChunk; i < end * kChunk; i += V::size()) {
      store_vec(y + i, at::vec::fmadd(V::loadu(x + i), a, b), stream);
    }
    if (stream) {
      stream_fence();
    }
  });
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

bool streaming_wins_at(int64_t pass_bytes) {
  const int64_t n = std::max<int64_t>(pass_bytes / 2 / sizeof(float) / kChunk, 1) * kChunk;
  const at::Tensor buf = at::empty({2 * n}, at::kFloat);
  float* x = buf.mutable_data_ptr<float>();
  float* y = x + n;
  std::fill(x, x + 2 * n, 1.0f);  // first touch: page faults out of the timing
  double normal = 1e30, streamed = 1e30;
  for (int round = 0; round < 4; ++round) {  // round 0 warms up
    const double tn = pass_seconds(x, y, n, false);
    const double ts = pass_seconds(x, y, n, true);
    if (round > 0) {
      normal = std::min(normal, tn);
      streamed = std::min(streamed, ts);
    }
  }
  return normal > kStreamingWinRatio * streamed;
}

}  // namespace bnext::cpu
