// Grid sizing shared by the router launchers: one wave of resident blocks (the kernels stride over
// tokens), never more than the shape asks for. Occupancy and SM count are host queries of the
// device's properties (no device data is read), cached per device.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace moekit::kernels::router {

inline int device_sm_count() {
  static std::atomic<int> cache[64];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    (void)cudaGetLastError();
    return 1;
  }
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n < 1) {
      (void)cudaGetLastError();
      return 1;
    }
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// min(wanted, blocks of `kernel` resident on the whole device at once), at least 1.
template <class Kernel>
int32_t resident_grid(Kernel kernel, int threads, size_t smem_bytes, int32_t wanted) {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes) != cudaSuccess) {
    (void)cudaGetLastError();
    per_sm = 1;
  }
  if (per_sm < 1) per_sm = 1;
  const int64_t resident = static_cast<int64_t>(per_sm) * device_sm_count();
  const int64_t grid = wanted < resident ? wanted : resident;
  return static_cast<int32_t>(grid < 1 ? 1 : grid);
}

}  // namespace moekit::kernels::router
