// Device memory for GPU tests: RAII buffers, uploads, downloads, poisoning.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "tests/support/catch.hpp"

#define CUDA_REQUIRE(expr)                                                              \
  do {                                                                                  \
    const cudaError_t cuda_require_error_ = (expr);                                     \
    INFO(#expr << " -> " << cudaGetErrorName(cuda_require_error_) << ": "               \
               << cudaGetErrorString(cuda_require_error_));                             \
    REQUIRE(cuda_require_error_ == cudaSuccess);                                        \
  } while (0)

// REQUIRE a moekit call to succeed, printing the library's message when it does not.
#define MOEKIT_REQUIRE_OK(expr)                                                         \
  do {                                                                                  \
    const moekit_status_t moekit_require_status_ = (expr);                              \
    INFO(#expr << " -> " << moekit_status_string(moekit_require_status_) << ": "        \
               << moekit_get_last_error());                                             \
    REQUIRE(moekit_require_status_ == MOEKIT_STATUS_SUCCESS);                           \
  } while (0)

namespace moekit::test {

// Bytes every poisoned buffer is filled with: NaN for fp32/fp16/bf16, -1 for int32.
constexpr int kPoisonByte = 0xff;

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes_ > 0 && cudaMalloc(&ptr_, bytes_) != cudaSuccess)
      throw std::runtime_error("cudaMalloc(" + std::to_string(bytes_) + ") failed");
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  template <class T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

  // Fills every byte with `byte` (default 0xff: NaN floats, -1 ints; pick another where -1 is a
  // legitimate value, e.g. the plan's sentinel). Finished before it returns: cudaMemset runs on
  // the legacy stream, which a cudaStreamNonBlocking stream does not wait for, so without the
  // synchronisation a late poison could land on the library's results (this bit the experts suite).
  void poison(int byte = kPoisonByte) { fill(byte); }
  void zero() { fill(0); }

  // Uploads and waits until the copy has landed (a pageable cudaMemcpy may return while the DMA
  // is still in flight relative to other streams).
  template <class T>
  static DeviceBuffer from(const std::vector<T>& host) {
    DeviceBuffer b(host.size() * sizeof(T));
    if (!host.empty() &&
        (cudaMemcpy(b.ptr_, host.data(), b.bytes_, cudaMemcpyHostToDevice) != cudaSuccess ||
         cudaDeviceSynchronize() != cudaSuccess))
      throw std::runtime_error("upload failed");
    return b;
  }

  template <class T>
  std::vector<T> to_host() const {
    std::vector<T> host(bytes_ / sizeof(T));
    if (!host.empty() &&
        cudaMemcpy(host.data(), ptr_, host.size() * sizeof(T), cudaMemcpyDeviceToHost) != cudaSuccess)
      throw std::runtime_error("download failed");
    return host;
  }

 private:
  void fill(int byte) {
    if (ptr_ && (cudaMemset(ptr_, byte, bytes_) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess))
      throw std::runtime_error("cudaMemset failed");
  }

  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// True when every byte equals the poison byte (nothing was written).
inline bool still_poisoned(const DeviceBuffer& b, int poison_byte = kPoisonByte) {
  for (uint8_t byte : b.to_host<uint8_t>())
    if (byte != static_cast<uint8_t>(poison_byte)) return false;
  return true;
}

}  // namespace moekit::test
