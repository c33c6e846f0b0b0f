// Host-side queries the launchers and the binding need.
#include <mutex>

#include "device_utils.cuh"

namespace bnext::cuda {

int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};
  static std::mutex lock;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    return 132;  // only sizes the grid; any positive value is correct
  }
  std::lock_guard<std::mutex> guard(lock);
  if (cached[device] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        sms <= 0) {
      sms = 132;
    }
    cached[device] = sms;
  }
  return cached[device];
}

}  // namespace bnext::cuda
