// The multi-GPU launcher of the EP tests and benchmark: one process drives every GPU. The
// communicators of each size n come from ncclCommInitAll over devices 0 .. n-1 (created once,
// destroyed by destroy_communicators at exit); run_ranks runs one host thread per rank, thread r
// on device r with its own stream, each calling the API for its rank.
//
// Failures inside a rank thread are recorded, never thrown through Catch (its assertions are not
// thread-safe): a rank body collects failures with EP_CHECK and stops at the first failed moekit
// call (EP_REQUIRE_OK). A rank that stops early releases the others' barriers, but leaves them
// waiting inside NCCL, so a watchdog ends the process (exit 1) when the ranks do not finish in
// time, after printing the failures so far and, per rank, the moekit call it is stuck in (every
// call made through EP_REQUIRE_OK / EP_CALL leaves a breadcrumb), the last call it returned from,
// the harness step (barrier, upload, download) and NCCL's asynchronous error. The allocation rule
// that keeps bodies from deadlocking against NCCL is stated at run_ranks.
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
#include "tests/support/random.hpp"

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

// Thrown by EP_REQUIRE_OK to end one rank's body.
struct RankAbort : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What a rank thread is doing, for the watchdog: the moekit call it entered and has not returned
// from, the last one it returned from, and the harness's own step (a barrier, a download, ...).
// Written by the rank thread, read by the watchdog (string literals only: #expr texts and fixed
// labels, so the pointers stay valid).
struct Breadcrumb {
  std::atomic<const char*> call{nullptr};
  std::atomic<int> call_line{0};
  std::atomic<int64_t> call_since_ms{0};
  std::atomic<const char*> last_call{nullptr};
  std::atomic<int> last_line{0};
  std::atomic<int64_t> calls_returned{0};
  std::atomic<const char*> step{"starting"};
  std::atomic<int> step_line{0};
  std::atomic<int64_t> step_since_ms{0};
  std::atomic<bool> finished{false};
};

inline int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The calling rank thread's breadcrumb (nullptr outside run_ranks: the helpers then do nothing).
inline Breadcrumb*& current_breadcrumb() {
  thread_local Breadcrumb* crumb = nullptr;
  return crumb;
}

// Marks the harness step of this rank thread (e.g. "download: cudaStreamSynchronize").
inline void crumb_step(const char* what, int line) {
  if (Breadcrumb* b = current_breadcrumb()) {
    b->step_since_ms.store(now_ms());
    b->step_line.store(line);
    b->step.store(what);
  }
}

// Runs f() as the rank's current moekit call (EP_CALL): entered, then returned.
template <class F>
auto crumb_call(const char* what, int line, F&& f) -> decltype(f()) {
  Breadcrumb* b = current_breadcrumb();
  if (b != nullptr) {
    b->call_since_ms.store(now_ms());
    b->call_line.store(line);
    b->call.store(what);
  }
  auto result = f();
  if (b != nullptr) {
    b->call.store(nullptr);
    b->last_line.store(line);
    b->last_call.store(what);
    b->calls_returned.fetch_add(1);
  }
  return result;
}

// A moekit call made by a rank thread, recorded in its breadcrumb; evaluates to the call's value.
#define EP_CALL(expr) ::moekit::test::ep::crumb_call(#expr, __LINE__, [&] { return (expr); })

// A reusable barrier for the rank threads (generation counting). When a rank leaves its body
// early (a failed call), abandon() wakes the others: their barrier waits throw RankAbort instead
// of waiting forever for a rank that will never arrive.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (abandoned_by_ >= 0) throw_abandoned();
    const long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_ || abandoned_by_ >= 0; });
      if (generation == generation_) throw_abandoned();
    }
  }
  void abandon(int rank) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (abandoned_by_ < 0) abandoned_by_ = rank;
    cv_.notify_all();
  }

 private:
  [[noreturn]] void throw_abandoned() {
    throw RankAbort("rank " + std::to_string(abandoned_by_) +
                    " left early (its failure is above), so this barrier can never complete");
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  long generation_ = 0;
  int abandoned_by_ = -1;
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
  // Every rank waits here. Also the quiet point of the allocation rule (see run_ranks).
  void sync(int line = 0) {
    crumb_step("barrier", line);
    barrier->wait();
    crumb_step("after a barrier", line);
  }
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

// Ends this rank's body when a moekit call fails; the call is recorded in the rank's breadcrumb.
#define EP_REQUIRE_OK(ctx, expr)                                                           \
  do {                                                                                     \
    const moekit_status_t ep_require_s_ = EP_CALL(expr);                                   \
    if (ep_require_s_ != MOEKIT_STATUS_SUCCESS) {                                          \
      (ctx).fail(__FILE__, __LINE__,                                                       \
                 std::string(#expr) + " -> " + moekit_status_string(ep_require_s_) + ": " + \
                     moekit_get_last_error());                                             \
      throw ::moekit::test::ep::RankAbort("moekit call failed");                           \
    }                                                                                      \
  } while (0)

#define EP_CUDA_OK(ctx, expr)                                                            \
  do {                                                                                   \
    ::moekit::test::ep::crumb_step(#expr, __LINE__);                                     \
    const cudaError_t ep_cuda_e_ = (expr);                                               \
    if (ep_cuda_e_ != cudaSuccess) {                                                     \
      (ctx).fail(__FILE__, __LINE__,                                                     \
                 std::string(#expr) + " -> " + cudaGetErrorName(ep_cuda_e_) + ": " +     \
                     cudaGetErrorString(ep_cuda_e_));                                    \
      throw ::moekit::test::ep::RankAbort("CUDA call failed");                           \
    }                                                                                    \
  } while (0)

// The first line of a call's text up to its '(' ("moekit_ep_dispatch"), for the watchdog.
inline std::string call_name_of(const char* expr) {
  if (expr == nullptr) return "-";
  std::string s(expr);
  const size_t paren = s.find('(');
  if (paren != std::string::npos && paren < 80) s.resize(paren);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

inline const char* nccl_result_name(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "ncclSuccess";
    case ncclInProgress: return "ncclInProgress";
    default: return ncclGetErrorString(r);
  }
}

// The watchdog's report: per rank, the moekit call in progress (entered, not returned) and for how
// long, the last call returned, the harness step, and the NCCL communicator's asynchronous error.
// Breadcrumbs first (plain memory), NCCL's state after (ncclCommGetAsyncError only reads the
// communicator's state, but a stuck process is no place for trust: a second timer ends the process
// if the queries block).
inline void report_stuck_ranks(const std::string& label, int timeout_s,
                               const std::vector<Breadcrumb>& crumbs,
                               const std::vector<ncclComm_t>& comms) {
  const int64_t now = now_ms();
  std::fflush(stdout);  // what the run printed so far (stdout is block-buffered into a log)
  std::fprintf(stderr,
               "EP watchdog: %s%sranks still running after %d s; the process ends now (exit 1); "
               "MOEKIT_TEST_SEED=%llu repeats the inputs\n",
               label.c_str(), label.empty() ? "" : ": ", timeout_s,
               static_cast<unsigned long long>(moekit::test::session_seed()));
  for (size_t r = 0; r < crumbs.size(); ++r) {
    const Breadcrumb& b = crumbs[r];
    if (b.finished.load()) {
      std::fprintf(stderr, "  rank %zu: finished\n", r);
      continue;
    }
    const char* call = b.call.load();
    const char* step = b.step.load();
    if (call != nullptr)
      std::fprintf(stderr, "  rank %zu: STUCK IN %s (line %d) for %.1f s", r,
                   call_name_of(call).c_str(), b.call_line.load(),
                   (now - b.call_since_ms.load()) / 1000.0);
    else
      std::fprintf(stderr, "  rank %zu: in no moekit call; harness step: %s (line %d) for %.1f s",
                   r, step != nullptr ? call_name_of(step).c_str() : "-", b.step_line.load(),
                   (now - b.step_since_ms.load()) / 1000.0);
    std::fprintf(stderr, "; %lld calls returned, the last %s (line %d)\n",
                 static_cast<long long>(b.calls_returned.load()),
                 call_name_of(b.last_call.load()).c_str(), b.last_line.load());
  }
  std::fflush(stderr);
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::seconds(10));
    std::fprintf(stderr, "EP watchdog: querying NCCL blocked for 10 s\n");
    std::fflush(nullptr);
    std::_Exit(1);
  }).detach();
  for (size_t r = 0; r < comms.size(); ++r) {
    ncclResult_t async = ncclSuccess;
    const ncclResult_t q = ncclCommGetAsyncError(comms[r], &async);
    std::fprintf(stderr, "  rank %zu: ncclCommGetAsyncError -> %s, async error %s\n", r,
                 nccl_result_name(q), nccl_result_name(async));
    std::fflush(stderr);
  }
}

// Runs body(ctx) for ranks 0 .. n-1 on their own threads and devices and returns the failures
// (empty when every rank passed). Ends the process (exit 1) if the ranks are not done in
// timeout_s, after report_stuck_ranks; `label` names the problem in that report.
// $MOEKIT_EP_TEST_TIMEOUT (seconds) overrides timeout_s, e.g. under compute-sanitizer.
//
// The allocation rule of the bodies (NCCL's rule for one process driving several GPUs):
// cudaMalloc, cudaFree, cudaMallocHost, cudaFreeHost (and so moekit_ep_create / destroy, and every
// DeviceBuffer / Guarded constructor or destructor) may wait for every GPU that has peer access to
// this one. If a peer's NCCL kernel is waiting for this rank's side of a collective that this
// thread has not issued yet, that wait never ends. So a body allocates or frees only where no
// collective can be half-issued: before its first collective, or after a ctx.sync() that every
// rank reaches once it has issued all of its earlier collectives, and in both cases ends the
// allocation phase with a ctx.sync() before its next collective. (Freeing after the rank's last
// collective, once its stream is synchronised, is safe: every collective it took part in has
// then been issued by all ranks.)
inline std::vector<std::string> run_ranks(int n, const std::function<void(RankContext&)>& body,
                                          int timeout_s = 120, const std::string& label = "") {
  if (const char* t = std::getenv("MOEKIT_EP_TEST_TIMEOUT")) {
    const int v = std::atoi(t);
    if (v > 0) timeout_s = v;
  }
  const std::vector<ncclComm_t>& comms = communicators(n);
  std::vector<std::string> failures;
  std::mutex failures_mutex;
  Barrier barrier(n);
  std::vector<Breadcrumb> crumbs(n);
  std::atomic<int> finished{0};
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      current_breadcrumb() = &crumbs[r];
      RankContext ctx;
      ctx.rank = r;
      ctx.num_ranks = n;
      ctx.comm = comms[r];
      ctx.barrier = &barrier;
      ctx.failures_mutex = &failures_mutex;
      ctx.failures = &failures;
      bool left_early = true;
      try {
        crumb_step("cudaSetDevice / cudaStreamCreate", __LINE__);
        if (cudaSetDevice(r) != cudaSuccess) throw std::runtime_error("cudaSetDevice failed");
        if (cudaStreamCreateWithFlags(&ctx.stream, cudaStreamNonBlocking) != cudaSuccess)
          throw std::runtime_error("cudaStreamCreate failed");
        crumb_step("the rank's body", __LINE__);
        body(ctx);
        left_early = false;
        crumb_step("cudaStreamSynchronize after the body", __LINE__);
        const cudaError_t e = cudaStreamSynchronize(ctx.stream);
        if (e != cudaSuccess)
          ctx.fail(__FILE__, __LINE__, std::string("stream error: ") + cudaGetErrorString(e));
      } catch (const RankAbort& e) {
        // The failed call is already recorded; a barrier abandoned by a peer is recorded here.
        if (std::strstr(e.what(), "left early") != nullptr) ctx.fail(__FILE__, __LINE__, e.what());
      } catch (const std::exception& e) {
        ctx.fail(__FILE__, __LINE__, std::string("exception: ") + e.what());
      }
      // A rank that leaves early never reaches its remaining barriers: release the others.
      if (left_early) barrier.abandon(r);
      crumb_step("cudaStreamDestroy", __LINE__);
      if (ctx.stream != nullptr) cudaStreamDestroy(ctx.stream);
      crumbs[r].finished.store(true);
      current_breadcrumb() = nullptr;
      finished.fetch_add(1);
    });
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (finished.load() < n) {
    if (std::chrono::steady_clock::now() > deadline) {
      {
        std::lock_guard<std::mutex> lock(failures_mutex);
        if (!failures.empty()) std::fprintf(stderr, "EP watchdog: failures so far:\n");
        for (const std::string& f : failures) std::fprintf(stderr, "  %s\n", f.c_str());
        std::fflush(stderr);
      }
      report_stuck_ranks(label, timeout_s, crumbs, comms);
      std::fflush(nullptr);
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
