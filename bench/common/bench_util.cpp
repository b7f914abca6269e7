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

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace

std::vector<int64_t> expert_counts(int experts, int64_t rows, bool skewed, uint64_t seed) {
  std::vector<double> w(experts, 1.0);
  if (skewed)
    for (int e = 0; e < experts; ++e) {
      const double u = static_cast<double>(splitmix64(seed + e) >> 11) * 0x1.0p-53;
      w[e] = u * u * u;  // two multiplications, not pow(): compare_torch.py does the same
    }
  double sum = 0;
  for (double x : w) sum += x;
  std::vector<int64_t> c(experts);
  int64_t assigned = 0;
  for (int e = 0; e < experts; ++e) assigned += (c[e] = static_cast<int64_t>(std::floor(rows * w[e] / sum)));
  for (int e = 0; assigned < rows; e = (e + 1) % experts, ++assigned) ++c[e];
  return c;
}

Timing summarise(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  const size_t n = us.size();
  Timing t;
  t.repeats = static_cast<int>(n);
  t.min_us = us.front();
  t.max_us = us.back();
  t.median_us = n % 2 ? us[n / 2] : 0.5 * (us[n / 2 - 1] + us[n / 2]);
  return t;
}

Timing time_us(cudaStream_t stream, int warmup, int repeats, const std::function<void(int)>& run) {
  return time_us_interleaved(stream, warmup, repeats, {run})[0];
}

std::vector<Timing> time_us_interleaved(cudaStream_t stream, int warmup, int repeats,
                                        const std::vector<std::function<void(int)>>& runs) {
  const size_t n = runs.size();
  for (const auto& run : runs)
    for (int i = 0; i < warmup; ++i) run(i);
  BENCH_CUDA(cudaStreamSynchronize(stream));
  std::vector<cudaEvent_t> events(2 * n * static_cast<size_t>(repeats));
  for (auto& e : events) BENCH_CUDA(cudaEventCreate(&e));
  auto ev = [&](size_t k, int i, int end) -> cudaEvent_t& { return events[2 * (k * repeats + i) + end]; };
  for (int i = 0; i < repeats; ++i) {
    for (size_t j = 0; j < n; ++j) {
      const size_t k = (j + static_cast<size_t>(i)) % n;
      BENCH_CUDA(cudaEventRecord(ev(k, i, 0), stream));
      runs[k](i);
      BENCH_CUDA(cudaEventRecord(ev(k, i, 1), stream));
    }
  }
  BENCH_CUDA(cudaStreamSynchronize(stream));
  BENCH_CUDA(cudaGetLastError());
  std::vector<Timing> out(n);
  for (size_t k = 0; k < n; ++k) {
    std::vector<double> us(repeats);
    for (int i = 0; i < repeats; ++i) {
      float ms = 0;
      BENCH_CUDA(cudaEventElapsedTime(&ms, ev(k, i, 0), ev(k, i, 1)));
      us[i] = 1000.0 * ms;
    }
    out[k] = summarise(std::move(us));
  }
  for (auto& e : events) cudaEventDestroy(e);
  return out;
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

DeviceBuffer::DeviceBuffer(size_t n) : bytes(n) { BENCH_CUDA(cudaMalloc(&p, std::max<size_t>(n, 1))); }

DeviceBuffer::~DeviceBuffer() {
  if (p) cudaFree(p);
}

double measure_write_bandwidth(cudaStream_t stream) {
  const size_t bytes = size_t(1) << 30;
  DeviceBuffer a(bytes);
  const Timing t = time_us(stream, 3, 20, [&](int i) {
    BENCH_CUDA(cudaMemsetAsync(a.p, i & 0xff, bytes, stream));
  });
  return static_cast<double>(bytes) / (t.median_us * 1e-6);
}

int l2_cache_bytes() {
  int device = 0, l2 = 0;
  BENCH_CUDA(cudaGetDevice(&device));
  BENCH_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  return l2;
}

int rotation_copies(double per_call, double set_bytes, double l2_bytes, double budget) {
  if (per_call < 1.0) return 1;  // T = 0: nothing is read
  double n = std::max(2.0, std::ceil(2.0 * l2_bytes / per_call) + 1.0);
  n = std::min(n, std::floor(budget / std::max(set_bytes, 1.0)));
  return static_cast<int>(std::max(1.0, std::min(n, 4096.0)));
}

std::vector<int32_t> router_indices(std::mt19937_64& rng, int64_t tokens, int top_k, int experts) {
  std::vector<int32_t> idx(static_cast<size_t>(tokens) * top_k);
  std::vector<int> perm(experts);
  for (int e = 0; e < experts; ++e) perm[e] = e;
  for (int64_t t = 0; t < tokens; ++t)
    for (int k = 0; k < top_k; ++k) {
      std::uniform_int_distribution<int> pick(k, experts - 1);
      std::swap(perm[k], perm[pick(rng)]);
      idx[t * top_k + k] = perm[k];
    }
  return idx;
}

std::vector<float> router_weights(std::mt19937_64& rng, size_t n) {
  std::uniform_real_distribution<float> u(0.01f, 1.0f);
  std::vector<float> w(n);
  for (auto& x : w) x = u(rng);
  return w;
}

moekit_dtype_t parse_dtype(const std::string& s) {
  if (s == "bf16") return MOEKIT_DTYPE_BF16;
  if (s == "f16") return MOEKIT_DTYPE_F16;
  if (s == "f32") return MOEKIT_DTYPE_F32;
  std::fprintf(stderr, "unknown --dtype=%s (bf16, f16, f32)\n", s.c_str());
  std::exit(2);
}

const char* dtype_name(moekit_dtype_t d) {
  return d == MOEKIT_DTYPE_F32 ? "f32" : d == MOEKIT_DTYPE_F16 ? "f16" : "bf16";
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

std::vector<std::string> Args::get_list(const std::string& key, const std::string& fallback) const {
  std::vector<std::string> out;
  std::stringstream ss(get(key, fallback));
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
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
