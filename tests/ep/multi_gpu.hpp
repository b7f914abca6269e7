// The multi-GPU launcher of the EP tests and benchmark: one process drives every GPU. The
// communicators of each size n come from ncclCommInitAll over devices 0 .. n-1 (created once,
// destroyed by destroy_communicators at exit); run_ranks runs one host thread per rank, thread r
// on device r with its own stream, each calling the API for its rank.
//
// Failures inside a rank thread are recorded, never thrown through Catch (its assertions are not
// thread-safe): a rank body collects failures with EP_CHECK and stops at the first failed moekit
// call (EP_REQUIRE_OK). A rank that stops early leaves the others waiting inside NCCL, so a
// watchdog ends the process (exit 1, failures printed) when the ranks do not finish in time: a
// broken run fails visibly instead of hanging the machine.
//
// NVLink multicast stays off: keep_nvls_off() sets NCCL_NVLS_ENABLE=0 before any communicator is
// created (unless it is already "0").
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "moekit/status.h"

namespace moekit::test::ep {

inline void keep_nvls_off() {
  const char* v = std::getenv("NCCL_NVLS_ENABLE");
  if (v == nullptr || std::strcmp(v, "0") != 0) setenv("NCCL_NVLS_ENABLE", "0", 1);
}

inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

inline std::map<int, std::vector<ncclComm_t>>& communicator_cache() {
  static std::map<int, std::vector<ncclComm_t>> cache;
  return cache;
}

// The communicators of ranks 0 .. n-1 on devices 0 .. n-1 (created on first use). Throws on
// failure.
inline const std::vector<ncclComm_t>& communicators(int n) {
  auto& cache = communicator_cache();
  auto it = cache.find(n);
  if (it != cache.end()) return it->second;
  keep_nvls_off();
  std::vector<ncclComm_t> comms(n);
  std::vector<int> devices(n);
  for (int i = 0; i < n; ++i) devices[i] = i;
  const ncclResult_t r = ncclCommInitAll(comms.data(), n, devices.data());
  if (r != ncclSuccess)
    throw std::runtime_error(std::string("ncclCommInitAll(") + std::to_string(n) +
                             ") failed: " + ncclGetErrorString(r));
  return cache.emplace(n, std::move(comms)).first->second;
}

inline void destroy_communicators() {
  for (auto& entry : communicator_cache())
    for (ncclComm_t c : entry.second) ncclCommDestroy(c);
  communicator_cache().clear();
}

// A reusable barrier for the rank threads (generation counting).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  long generation_ = 0;
};

// Thrown by EP_REQUIRE_OK to end one rank's body.
struct RankAbort : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct RankContext {
  int rank = 0;
  int num_ranks = 0;
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  Barrier* barrier = nullptr;
  std::mutex* failures_mutex = nullptr;
  std::vector<std::string>* failures = nullptr;
  int failure_count = 0;

  void fail(const char* file, int line, const std::string& what) {
    ++failure_count;
    std::ostringstream s;
    s << file << ":" << line << ": rank " << rank << "/" << num_ranks << ": " << what;
    std::lock_guard<std::mutex> lock(*failures_mutex);
    // Keep the first few failures of each rank: the first one is the one that matters.
    if (failure_count <= 8) failures->push_back(s.str());
  }
  void sync() { barrier->wait(); }
};

// Records a failure (and goes on) when cond is false; `msg` is streamed.
#define EP_CHECK(ctx, cond, msg)                                   \
  do {                                                             \
    if (!(cond)) {                                                 \
      std::ostringstream ep_check_s_;                              \
      ep_check_s_ << "CHECK(" #cond ") failed: " << msg;           \
      (ctx).fail(__FILE__, __LINE__, ep_check_s_.str());           \
    }                                                              \
  } while (0)

// Ends this rank's body when a moekit call fails.
#define EP_REQUIRE_OK(ctx, expr)                                                           \
  do {                                                                                     \
    const moekit_status_t ep_require_s_ = (expr);                                          \
    if (ep_require_s_ != MOEKIT_STATUS_SUCCESS) {                                          \
      (ctx).fail(__FILE__, __LINE__,                                                       \
                 std::string(#expr) + " -> " + moekit_status_string(ep_require_s_) + ": " + \
                     moekit_get_last_error());                                             \
      throw ::moekit::test::ep::RankAbort("moekit call failed");                           \
    }                                                                                      \
  } while (0)

#define EP_CUDA_OK(ctx, expr)                                                            \
  do {                                                                                   \
    const cudaError_t ep_cuda_e_ = (expr);                                               \
    if (ep_cuda_e_ != cudaSuccess) {                                                     \
      (ctx).fail(__FILE__, __LINE__,                                                     \
                 std::string(#expr) + " -> " + cudaGetErrorName(ep_cuda_e_) + ": " +     \
                     cudaGetErrorString(ep_cuda_e_));                                    \
      throw ::moekit::test::ep::RankAbort("CUDA call failed");                           \
    }                                                                                    \
  } while (0)

// Runs body(ctx) for ranks 0 .. n-1 on their own threads and devices and returns the failures
// (empty when every rank passed). Ends the process if the ranks are not done in timeout_s.
// $MOEKIT_EP_TEST_TIMEOUT (seconds) overrides timeout_s, e.g. under compute-sanitizer.
inline std::vector<std::string> run_ranks(int n, const std::function<void(RankContext&)>& body,
                                          int timeout_s = 120) {
  if (const char* t = std::getenv("MOEKIT_EP_TEST_TIMEOUT")) {
    const int v = std::atoi(t);
    if (v > 0) timeout_s = v;
  }
  const std::vector<ncclComm_t>& comms = communicators(n);
  std::vector<std::string> failures;
  std::mutex failures_mutex;
  Barrier barrier(n);
  std::atomic<int> finished{0};
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      RankContext ctx;
      ctx.rank = r;
      ctx.num_ranks = n;
      ctx.comm = comms[r];
      ctx.barrier = &barrier;
      ctx.failures_mutex = &failures_mutex;
      ctx.failures = &failures;
      try {
        if (cudaSetDevice(r) != cudaSuccess) throw std::runtime_error("cudaSetDevice failed");
        if (cudaStreamCreateWithFlags(&ctx.stream, cudaStreamNonBlocking) != cudaSuccess)
          throw std::runtime_error("cudaStreamCreate failed");
        body(ctx);
        const cudaError_t e = cudaStreamSynchronize(ctx.stream);
        if (e != cudaSuccess)
          ctx.fail(__FILE__, __LINE__, std::string("stream error: ") + cudaGetErrorString(e));
      } catch (const RankAbort&) {
        // already recorded
      } catch (const std::exception& e) {
        ctx.fail(__FILE__, __LINE__, std::string("exception: ") + e.what());
      }
      if (ctx.stream != nullptr) cudaStreamDestroy(ctx.stream);
      finished.fetch_add(1);
    });
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (finished.load() < n) {
    if (std::chrono::steady_clock::now() > deadline) {
      std::fprintf(stderr, "EP watchdog: ranks still running after %d s (a rank stuck in NCCL?)\n",
                   timeout_s);
      std::lock_guard<std::mutex> lock(failures_mutex);
      for (const std::string& f : failures) std::fprintf(stderr, "  %s\n", f.c_str());
      std::fflush(stderr);
      std::_Exit(1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (std::thread& t : threads) t.join();
  return failures;
}

// The EP sizes to test: 1, 2, 4 and every GPU, as far as there are GPUs (at most
// $MOEKIT_EP_TEST_MAX_RANKS when set, e.g. 2 for a quick or compute-sanitizer run).
inline std::vector<int> ep_sizes(bool with_one) {
  int g = device_count();
  if (const char* cap = std::getenv("MOEKIT_EP_TEST_MAX_RANKS")) {
    const int c = std::atoi(cap);
    if (c >= 1 && c < g) g = c;
  }
  std::vector<int> sizes;
  for (int s : {1, 2, 4, g})
    if ((s > 1 || with_one) && s <= g && (sizes.empty() || sizes.back() < s)) sizes.push_back(s);
  return sizes;
}

}  // namespace moekit::test::ep
