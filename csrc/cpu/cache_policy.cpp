#include "cache_policy.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <string>

#include "store_probe.h"

namespace bnext::cpu {

namespace {

// Size in bytes of the highest cache level sysfs lists for cpu0, or 0.
// sysconf(_SC_LEVEL3_CACHE_SIZE) is not used first: in VMs it can report
// every L3 of the host summed.
int64_t sysfs_llc_bytes() {
  int64_t best_level = 0, best_size = 0;
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level_f(dir + "level"), size_f(dir + "size");
    int64_t level = 0;
    std::string size;
    if (!(level_f >> level) || !(size_f >> size) || size.empty()) {
      continue;
    }
    int64_t bytes = std::strtoll(size.c_str(), nullptr, 10);
    const char unit = size.back();
    bytes *= unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1;
    if (level >= best_level && bytes > 0) {
      best_level = level;
      best_size = bytes;
    }
  }
  return best_size;
}

// The listed size, read once per process.
int64_t llc_bytes() {
  static const int64_t llc = [] {
    if (const int64_t b = sysfs_llc_bytes(); b > 0) {
      return b;
    }
    const long b = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return b > 0 ? int64_t{b} : int64_t{32} << 20;
  }();
  return llc;
}

// The cache a VM's guest can use may be far smaller than the size sysfs
// gives, and then outputs well under the listed size already miss it.
// So a pass of kProbePassBytes is timed once, both ways
// (streaming_wins_at); where streaming wins, the cache is taken to be
// kProbePassBytes / 4. Callers ask only about sizes the answer changes,
// so a machine whose passes never reach them never runs the probe.
constexpr int64_t kProbePassBytes = int64_t{24} << 20;
constexpr int64_t kSmallCache = kProbePassBytes / 4;

bool small_usable_cache() {
  static const bool small = llc_bytes() > kProbePassBytes && streaming_wins_at(kProbePassBytes);
  return small;
}

int from_env(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr ? -1 : std::atoi(env) != 0;
}

// One slot per Tuning value, first read from its environment variable.
std::atomic<int>* forced_choices() {
  static std::atomic<int> choices[] = {from_env("BNEXT_STREAMING_STORES"),
                                       from_env("BNEXT_RESIDENT")};
  return choices;
}

}  // namespace

int forced_choice(Tuning which) {
  return forced_choices()[static_cast<int>(which)].load(std::memory_order_relaxed);
}

void set_forced_choice(Tuning which, int value) {
  forced_choices()[static_cast<int>(which)].store(value < 0 ? -1 : value != 0,
                                                  std::memory_order_relaxed);
}

bool stream_stores(int64_t pass_bytes, bool wide_rows) {
  const int forced = forced_choice(Tuning::StreamingStores);
  if (forced >= 0) {
    return forced != 0;
  }
  // Streaming pays once the output would leave the cache anyway; wide
  // channels-inner rows gain from it earlier than planes and narrow rows.
  const int64_t llc = llc_bytes();
  auto over = [&](int64_t cache) {
    return pass_bytes > (wide_rows ? cache * 3 / 4 : cache * 3 / 2);
  };
  if (over(llc)) {
    return true;
  }
  // (small_usable_cache never probes where the listed cache is no larger
  // than the probe pass.)
  return over(kSmallCache) && small_usable_cache();
}

bool fits_last_level_cache(int64_t bytes) {
  return bytes <= llc_bytes();
}

bool fits_usable_cache(int64_t bytes) {
  if (!fits_last_level_cache(bytes)) {
    return false;
  }
  return bytes <= kSmallCache || !small_usable_cache();
}

}  // namespace bnext::cpu
