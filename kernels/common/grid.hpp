// Grid sizing shared by the launchers of every family: one wave of resident blocks (persistent and
// grid-stride kernels), never more than the shape asks for. Occupancy and SM count are host queries of the
// device's properties (no device data is read), cached per device: a call pays one cudaGetDevice
// and a table look-up, not an occupancy calculation. Also the one cudaLaunchKernelEx wrapper for
// launches that carry an attribute (launch_with_attribute, at the end).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

namespace moekit::kernels {

inline int current_device() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  return device;
}

// Attribute kAttr of `device`, read once per device (kept as value + 1: 0 means not yet read) and
// `fallback` where it cannot be read. Devices past the table are queried on every call.
template <cudaDeviceAttr kAttr>
inline int cached_device_attribute(int device, int fallback) {
  static std::atomic<int> cache[64];
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v != 0) return v - 1;
  }
  int n = 0;
  if (device < 0 || cudaDeviceGetAttribute(&n, kAttr, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return fallback;
  }
  if (cached) cache[device].store(n + 1, std::memory_order_relaxed);
  return n;
}

inline int device_sm_count(int device) {
  const int n = cached_device_attribute<cudaDevAttrMultiProcessorCount>(device, 1);
  return n < 1 ? 1 : n;
}

// Whether `device` takes cooperative launches (false where it cannot be asked).
inline bool device_cooperative_launch(int device) {
  return cached_device_attribute<cudaDevAttrCooperativeLaunch>(device, 0) != 0;
}

inline int device_sm_count() { return device_sm_count(current_device()); }

// Blocks of `kernel` resident per SM for (threads, smem_bytes) on `device`, cached (a kernel's
// resources do not change while the process runs). Thread-safe.
inline int blocks_per_sm(const void* kernel, int threads, size_t smem_bytes, int device) {
  struct Entry {
    const void* kernel;
    int threads;
    size_t smem;
    int device;
    int per_sm;
  };
  static std::mutex mutex;
  static std::vector<Entry> entries;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (const Entry& e : entries)
      if (e.kernel == kernel && e.threads == threads && e.smem == smem_bytes && e.device == device) return e.per_sm;
  }
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;  // not cached: a later call asks again
  }
  if (per_sm < 1) per_sm = 1;
  std::lock_guard<std::mutex> lock(mutex);
  entries.push_back({kernel, threads, smem_bytes, device, per_sm});
  return per_sm;
}

// min(wanted, blocks of `kernel` resident on the whole device at once), at least 1. A kernel that
// needs more than 48 KiB of dynamic shared memory calls ensure_dynamic_smem first (the occupancy
// query counts with the limit set).
template <class Kernel>
int32_t resident_grid(Kernel kernel, int threads, size_t smem_bytes, int64_t wanted) {
  const int device = current_device();
  const void* fn = reinterpret_cast<const void*>(kernel);
  const int per_sm = blocks_per_sm(fn, threads, smem_bytes, device);
  const int64_t resident = static_cast<int64_t>(per_sm) * device_sm_count(device);
  const int64_t grid = wanted < resident ? wanted : resident;
  return static_cast<int32_t>(grid < 1 ? 1 : grid);
}

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) once per (kernel, device) for at least `bytes`
// (the attribute only raises the limit; a kernel keeps the largest value set).
template <class Kernel>
cudaError_t ensure_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  struct Entry {
    const void* kernel;
    int device;
    size_t bytes;
  };
  static std::mutex mutex;
  static std::vector<Entry> entries;
  const int device = current_device();
  const void* fn = reinterpret_cast<const void*>(kernel);
  std::lock_guard<std::mutex> lock(mutex);
  for (Entry& e : entries)
    if (e.kernel == fn && e.device == device && e.bytes >= bytes) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  entries.push_back({fn, device, bytes});
  return cudaSuccess;
}

// kernel<<<grid, block, smem, stream>>>(args...) through cudaLaunchKernelEx with one launch
// attribute, or none (attribute == nullptr): the one place the launchers that need an attribute
// (cooperative, programmatic) spell out the configuration. Returns the launch's own error, not
// cudaPeekAtLastError, so a caller can fall back on a launch the device refused.
template <class... Params, class... Args>
inline cudaError_t launch_with_attribute(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                         cudaStream_t stream, const cudaLaunchAttribute* attribute, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attributes[1] = {};
  if (attribute != nullptr) attributes[0] = *attribute;
  config.attrs = attributes;
  config.numAttrs = attribute != nullptr ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Args&&>(args)...);
}

}  // namespace moekit::kernels
