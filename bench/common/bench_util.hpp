// Shared by every benchmark tool: CUDA-event timing (median over repeats after warm-up, with
// input rotation so repeated runs do not measure the L2), the measured copy-bandwidth ceiling,
// a tiny command-line parser and a JSON writer, device buffers, the rotation-copy count and the
// router-like random routing the token benchmarks share. Benchmarks validate before they time.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "moekit/status.h"

namespace moekit::bench {

#define BENCH_CUDA(expr)                                                                     \
  do {                                                                                       \
    const cudaError_t bench_error_ = (expr);                                                 \
    if (bench_error_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #expr,                   \
                   cudaGetErrorString(bench_error_));                                        \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

// Exits (status 1) naming the call, its status and the library's last error when a moekit call
// does not succeed.
#define BENCH_OK(expr)                                                                       \
  do {                                                                                       \
    const moekit_status_t bench_status_ = (expr);                                            \
    if (bench_status_ != MOEKIT_STATUS_SUCCESS) {                                            \
      std::fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #expr,               \
                   moekit_status_string(bench_status_), moekit_get_last_error());            \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

// A device allocation of `bytes` (at least one byte is allocated, so a zero-sized tensor still has
// a valid pointer); move-only. `bytes` is the size asked for.
struct DeviceBuffer {
  void* p = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept : p(o.p), bytes(o.bytes) {
    o.p = nullptr;
    o.bytes = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(p, o.p);
    std::swap(bytes, o.bytes);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(p); }
  char* at(size_t byte_offset) const { return static_cast<char*>(p) + byte_offset; }
  template <class T>
  void upload(const std::vector<T>& v) {
    if (!v.empty()) BENCH_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  // The first n elements.
  template <class T>
  std::vector<T> download(size_t n) const {
    std::vector<T> v(n);
    if (n) BENCH_CUDA(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
  // The whole buffer.
  template <class T>
  std::vector<T> download() const { return download<T>(bytes / sizeof(T)); }
};

struct Timing {
  double median_us = 0;
  double min_us = 0;
  double max_us = 0;
  int repeats = 0;
};

// Median / min / max of timed samples (microseconds, any order, at least one); repeats = their count.
Timing summarise(std::vector<double> us);

// Times `run(i)` (i = repeat index, use it to rotate inputs) with CUDA events on `stream`:
// `warmup` untimed calls, then `repeats` individually timed ones; returns median/min/max.
Timing time_us(cudaStream_t stream, int warmup, int repeats, const std::function<void(int)>& run);

// Several implementations of one job timed in interleaved rounds: each round runs every run(i)
// once, back to back, the order rotated by one per round; one Timing per implementation. Timed one
// after the other, the implementation measured after a long heavy loop runs on a hotter GPU (the
// same kernels measured 5-19 % apart by position alone on an H200); this gives all the same history.
std::vector<Timing> time_us_interleaved(cudaStream_t stream, int warmup, int repeats,
                                        const std::vector<std::function<void(int)>>& runs);

// Launches an empty kernel (one warp, no work) on `stream` (bench/common/empty_kernel.cu): the
// launch floor that benchmarks of small ops time beside their calls.
void launch_empty_kernel(cudaStream_t stream);

// Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written, of a
// buffer far larger than L2 (the memory-bound ceiling every floor uses).
double measure_copy_bandwidth(cudaStream_t stream);

// Bytes written per second by cudaMemsetAsync over 1 GiB: what an op that mostly writes (permute
// writes K rows per token read) can reach at best, next to the copy bandwidth the floors use.
double measure_write_bandwidth(cudaStream_t stream);

// The L2 size of the current device in bytes.
int l2_cache_bytes();

// How many copies to rotate over so that one round of calls (each touching `per_call` bytes)
// is at least twice the L2: at least 2, fewer only when `budget` (what all copies of
// `set_bytes` each together may use) runs short or nothing is read, never below 1, at most 4096.
int rotation_copies(double per_call, double set_bytes, double l2_bytes, double budget);

// Rows per expert of the experts benchmarks: balanced (rows / E each), or proportional to u^3
// (u = splitmix64(seed + e) / 2^64, so compare_torch.py draws the very same counts); the remainder
// of the floors goes one row each to experts 0, 1, ...
std::vector<int64_t> expert_counts(int experts, int64_t rows, bool skewed, uint64_t seed);

// Router-like routing: K distinct uniformly random experts per token ([T, K], row-major).
std::vector<int32_t> router_indices(std::mt19937_64& rng, int64_t tokens, int top_k, int experts);

// n routing weights, uniform in [0.01, 1).
std::vector<float> router_weights(std::mt19937_64& rng, size_t n);

// --dtype=bf16|f16|f32 (exits with status 2 on anything else), and back to its name.
moekit_dtype_t parse_dtype(const std::string& s);
const char* dtype_name(moekit_dtype_t d);

// "Name (sm_XY, N SMs)" of the current device.
std::string device_description();

// The commit the benchmark was built from (MOEKIT_GIT_COMMIT at configure time), or "unknown".
std::string build_commit();

// Current UTC time as ISO-8601.
std::string utc_now();

// --key=value / --flag command-line options.
class Args {
 public:
  Args(int argc, char** argv);
  bool has(const std::string& key) const;
  std::string get(const std::string& key, const std::string& fallback) const;
  int64_t get_int(const std::string& key, int64_t fallback) const;
  double get_double(const std::string& key, double fallback) const;
  // A comma-separated value as its non-empty items (--tokens=4096,32768).
  std::vector<std::string> get_list(const std::string& key, const std::string& fallback) const;
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_;
};

// A minimal JSON builder (objects, arrays, numbers, strings), enough for result files.
class Json {
 public:
  static Json object();
  static Json array();
  Json& set(const std::string& key, const Json& value);
  Json& set(const std::string& key, const std::string& value);
  Json& set(const std::string& key, const char* value);
  Json& set(const std::string& key, double value);
  Json& set(const std::string& key, int64_t value);
  Json& set(const std::string& key, int value) { return set(key, static_cast<int64_t>(value)); }
  Json& set(const std::string& key, bool value);
  Json& push(const Json& value);
  std::string dump(int indent = 0) const;

 private:
  enum class Kind { Object, Array, Raw } kind_ = Kind::Raw;
  std::vector<std::pair<std::string, Json>> members_;
  std::string raw_;
  static Json raw(const std::string& text);
};

std::string json_escape(const std::string& s);

// Writes `text` to `path` (creating nothing else); returns false on failure.
bool write_file(const std::string& path, const std::string& text);

}  // namespace moekit::bench
