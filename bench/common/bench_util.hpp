// Shared by every benchmark tool: CUDA-event timing (median over repeats after warm-up, with
// input rotation so repeated runs do not measure the L2), the measured copy-bandwidth ceiling,
// a tiny command-line parser and a JSON writer. Benchmarks validate before they time.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

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

struct Timing {
  double median_us = 0;
  double min_us = 0;
  double max_us = 0;
  int repeats = 0;
};

// Times `run(i)` (i = repeat index, use it to rotate inputs) with CUDA events on `stream`:
// `warmup` untimed calls, then `repeats` individually timed ones; returns median/min/max.
Timing time_us(cudaStream_t stream, int warmup, int repeats, const std::function<void(int)>& run);

// Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written, of a
// buffer far larger than L2 (the memory-bound ceiling every floor uses).
double measure_copy_bandwidth(cudaStream_t stream);

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
