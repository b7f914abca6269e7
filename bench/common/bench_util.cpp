#include "bench/common/bench_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <sstream>

#ifndef MOEKIT_GIT_COMMIT
#define MOEKIT_GIT_COMMIT "unknown"
#endif

namespace moekit::bench {

Timing time_us(cudaStream_t stream, int warmup, int repeats, const std::function<void(int)>& run) {
  for (int i = 0; i < warmup; ++i) run(i);
  BENCH_CUDA(cudaStreamSynchronize(stream));
  std::vector<cudaEvent_t> events(2 * static_cast<size_t>(repeats));
  for (auto& e : events) BENCH_CUDA(cudaEventCreate(&e));
  for (int i = 0; i < repeats; ++i) {
    BENCH_CUDA(cudaEventRecord(events[2 * i], stream));
    run(i);
    BENCH_CUDA(cudaEventRecord(events[2 * i + 1], stream));
  }
  BENCH_CUDA(cudaStreamSynchronize(stream));
  BENCH_CUDA(cudaGetLastError());
  std::vector<double> us(repeats);
  for (int i = 0; i < repeats; ++i) {
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, events[2 * i], events[2 * i + 1]));
    us[i] = 1000.0 * ms;
  }
  for (auto& e : events) cudaEventDestroy(e);
  std::sort(us.begin(), us.end());
  Timing t;
  t.repeats = repeats;
  t.min_us = us.front();
  t.max_us = us.back();
  t.median_us = repeats % 2 ? us[repeats / 2] : 0.5 * (us[repeats / 2 - 1] + us[repeats / 2]);
  return t;
}

double measure_copy_bandwidth(cudaStream_t stream) {
  const size_t bytes = size_t(1) << 30;  // 1 GiB each way: far past any L2
  void *a = nullptr, *b = nullptr;
  BENCH_CUDA(cudaMalloc(&a, bytes));
  BENCH_CUDA(cudaMalloc(&b, bytes));
  BENCH_CUDA(cudaMemsetAsync(a, 1, bytes, stream));
  const Timing t = time_us(stream, 3, 20, [&](int i) {
    BENCH_CUDA(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice, stream));
  });
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(bytes) / (t.median_us * 1e-6);
}

std::string device_description() {
  int device = 0;
  cudaGetDevice(&device);
  cudaDeviceProp p{};
  cudaGetDeviceProperties(&p, device);
  std::ostringstream s;
  s << p.name << " (sm_" << p.major << p.minor << ", " << p.multiProcessorCount << " SMs)";
  return s.str();
}

std::string build_commit() {
  // The GPU machine gets a copy of the tree without .git: the caller passes MOEKIT_COMMIT.
  if (const char* c = std::getenv("MOEKIT_COMMIT")) return c;
  return MOEKIT_GIT_COMMIT;
}

std::string utc_now() {
  std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return buf;
}

Args::Args(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) == 0) {
      const auto eq = a.find('=');
      if (eq == std::string::npos)
        values_[a.substr(2)] = "1";
      else
        values_[a.substr(2, eq - 2)] = a.substr(eq + 1);
    } else {
      positional_.push_back(a);
    }
  }
}

bool Args::has(const std::string& key) const { return values_.count(key) != 0; }

std::string Args::get(const std::string& key, const std::string& fallback) const {
  auto it = values_.find(key);
  return it == values_.end() ? fallback : it->second;
}

int64_t Args::get_int(const std::string& key, int64_t fallback) const {
  auto it = values_.find(key);
  return it == values_.end() ? fallback : std::strtoll(it->second.c_str(), nullptr, 0);
}

double Args::get_double(const std::string& key, double fallback) const {
  auto it = values_.find(key);
  return it == values_.end() ? fallback : std::strtod(it->second.c_str(), nullptr);
}

std::string json_escape(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

Json Json::object() {
  Json j;
  j.kind_ = Kind::Object;
  return j;
}
Json Json::array() {
  Json j;
  j.kind_ = Kind::Array;
  return j;
}
Json Json::raw(const std::string& text) {
  Json j;
  j.raw_ = text;
  return j;
}
Json& Json::set(const std::string& key, const Json& value) {
  members_.emplace_back(key, value);
  return *this;
}
Json& Json::set(const std::string& key, const std::string& value) { return set(key, raw(json_escape(value))); }
Json& Json::set(const std::string& key, const char* value) { return set(key, std::string(value)); }
Json& Json::set(const std::string& key, double value) {
  if (!std::isfinite(value)) return set(key, raw("null"));
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.6g", value);
  return set(key, raw(buf));
}
Json& Json::set(const std::string& key, int64_t value) { return set(key, raw(std::to_string(value))); }
Json& Json::set(const std::string& key, bool value) { return set(key, raw(value ? "true" : "false")); }
Json& Json::push(const Json& value) {
  members_.emplace_back(std::string(), value);
  return *this;
}

std::string Json::dump(int indent) const {
  if (kind_ == Kind::Raw) return raw_;
  const std::string pad(indent + 2, ' '), end_pad(indent, ' ');
  std::string out = kind_ == Kind::Object ? "{" : "[";
  for (size_t i = 0; i < members_.size(); ++i) {
    out += i ? ",\n" : "\n";
    out += pad;
    if (kind_ == Kind::Object) out += json_escape(members_[i].first) + ": ";
    out += members_[i].second.dump(indent + 2);
  }
  if (!members_.empty()) out += "\n" + end_pad;
  out += kind_ == Kind::Object ? "}" : "]";
  return out;
}

bool write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  if (!f) return false;
  f << text << "\n";
  return static_cast<bool>(f);
}

}  // namespace moekit::bench
