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

// An occupancy answer for (kernel, threads, smem_bytes, cluster size; 0: no cluster) on `device`,
// cached (a kernel's resources do not change while the process runs): query(&n) asks the runtime;
// where it fails, `fallback` is returned and nothing cached (a later call asks again). Thread-safe.
template <class Query>
int cached_occupancy(const void* kernel, int threads, size_t smem_bytes, int cluster, int device, int fallback,
                     Query&& query) {
  struct Entry {
    const void* kernel;
    int threads;
    size_t smem;
    int cluster;
    int device;
    int value;
  };
  static std::mutex mutex;
  static std::vector<Entry> entries;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (const Entry& e : entries)
      if (e.kernel == kernel && e.threads == threads && e.smem == smem_bytes && e.cluster == cluster &&
          e.device == device)
        return e.value;
  }
  int value = 0;
  if (query(&value) != cudaSuccess) {
    (void)cudaGetLastError();
    return fallback;
  }
  std::lock_guard<std::mutex> lock(mutex);
  entries.push_back({kernel, threads, smem_bytes, cluster, device, value});
  return value;
}

// Blocks of `kernel` resident per SM for (threads, smem_bytes) on `device` (at least 1), cached.
inline int blocks_per_sm(const void* kernel, int threads, size_t smem_bytes, int device) {
  const int per_sm = cached_occupancy(kernel, threads, smem_bytes, 0, device, 1, [&](int* n) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, kernel, threads, smem_bytes);
  });
  return per_sm < 1 ? 1 : per_sm;
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

// The cudaLaunchConfig_t of <<<grid, block, smem, stream>>> with one launch attribute, or none
// (attribute == nullptr); `storage` holds the attribute for as long as the config is used.
inline cudaLaunchConfig_t launch_config(dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                        const cudaLaunchAttribute* attribute, cudaLaunchAttribute& storage) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  if (attribute != nullptr) storage = *attribute;
  config.attrs = &storage;
  config.numAttrs = attribute != nullptr ? 1 : 0;
  return config;
}

// kernel<<<grid, block, smem, stream>>>(args...) through cudaLaunchKernelEx with one launch
// attribute, or none (attribute == nullptr): the one place the launchers that need an attribute
// (cooperative, programmatic, cluster) spell out the configuration. Returns the launch's own error,
// not cudaPeekAtLastError, so a caller can fall back on a launch the device refused.
template <class... Params, class... Args>
inline cudaError_t launch_with_attribute(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                         cudaStream_t stream, const cudaLaunchAttribute* attribute, Args&&... args) {
  cudaLaunchAttribute storage{};
  const cudaLaunchConfig_t config = launch_config(grid, block, smem, stream, attribute, storage);
  return cudaLaunchKernelEx(&config, kernel, static_cast<Args&&>(args)...);
}

// The launch attribute of clusters of `size` CTAs along x.
inline cudaLaunchAttribute cluster_attribute(int size) {
  cudaLaunchAttribute a{};
  a.id = cudaLaunchAttributeClusterDimension;
  a.val.clusterDim.x = static_cast<unsigned>(size);
  a.val.clusterDim.y = 1;
  a.val.clusterDim.z = 1;
  return a;
}

// As resident_grid, in clusters of `size` CTAs: min(wanted clusters, clusters of `kernel`
// resident on the whole device at once) times `size` CTAs, 0 where not one cluster fits (or the
// device cannot say). Some SMs may be left out: clusters do not straddle GPCs.
template <class Kernel>
int32_t resident_cluster_grid(Kernel kernel, int threads, size_t smem_bytes, int size, int64_t wanted) {
  const void* fn = reinterpret_cast<const void*>(kernel);
  const cudaLaunchAttribute cluster = cluster_attribute(size);
  const int resident = cached_occupancy(fn, threads, smem_bytes, size, current_device(), 0, [&](int* n) {
    cudaLaunchAttribute storage{};
    const cudaLaunchConfig_t config = launch_config(dim3(static_cast<unsigned>(size)), dim3(threads), smem_bytes,
                                                    nullptr, &cluster, storage);
    return cudaOccupancyMaxActiveClusters(n, kernel, &config);
  });
  const int64_t clusters = wanted < resident ? wanted : resident;
  return static_cast<int32_t>(clusters < 1 ? 0 : clusters * size);
}

}  // namespace moekit::kernels
