// moekit-bench-ep: expert-parallel dispatch and combine over NCCL on all (or --gpus=N) GPUs of one
// host, one process with a thread per GPU (tests/ep/multi_gpu.hpp), next to NCCL moving the same
// bytes in the same run on the same GPUs:
//   nccl_alltoall       ncclAlltoAll with the dispatch's mean remote bytes split evenly over peers
//   nccl_p2p_same_split one ncclGroup of ncclSend/ncclRecv with the dispatch's exact per-pair bytes
//                       (what the dispatch's transfers alone cost)
//
//   moekit-bench-ep --preset=deepseek-v3 --json=out.json
//   moekit-bench-ep --tokens=4096 --hidden=7168 --top-k=8 --experts=256 --gpus=4 --chunks=1,4
//
// Preset deepseek-v3 (the default; "all" is the same): T = 4096 tokens per rank, H = 7168 bf16, K = 8, E = 256,
// uniform random routing (K distinct experts per token) with a fixed --seed. Overrides: --tokens
// --hidden --top-k --experts --gpus --modes=exact,capacity --chunks=1,2,4,8 --warmup --repeats
// --seed.
//
// Bytes and bandwidth. A rank's payload is the rows it sends to other ranks (tokens that also go
// to this rank are copied locally and not counted) times H * 2 bytes; the dispatch also moves
// (2K + 1) * 4 bytes of ids/weights per row (reported as meta_bytes). Bus bandwidth is the mean
// payload per rank over the slowest rank's median time, the nccl-tests convention for all-to-all
// (algbw * (n - 1) / n); combine moves the same rows back. The fraction reported is dispatch (or
// combine) bus bandwidth over the all-to-all's, measured in the same run. Capacity mode (capacity
// = T, never drops) moves (n - 1) * T rows per rank and is compared with an all-to-all of those
// bytes. Times: per rank, the median of --repeats CUDA-event timings after --warmup; layout (the
// count exchange and the one host read in exact mode) is timed separately from dispatch.
// Before timing, a small problem is checked against the CPU reference (rows bitwise, combine
// bitwise) in both modes; a mismatch aborts.
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench/common/bench_util.hpp"
#include "moekit/ep.h"
#include "tests/ep/ep_problem.hpp"
#include "tests/ep/multi_gpu.hpp"
#include "tests/reference/ep_ref.hpp"
#include "tests/support/numeric.hpp"

namespace {

using moekit::bench::Json;
using namespace moekit::test::ep;

struct DevBuf {
  void* p = nullptr;
  size_t bytes = 0;
  explicit DevBuf(size_t n) : bytes(n) {
    if (cudaMalloc(&p, std::max<size_t>(n, 256)) != cudaSuccess)
      throw std::runtime_error("cudaMalloc(" + std::to_string(n) + ") failed");
  }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
  template <class T>
  void upload(const std::vector<T>& v, cudaStream_t s) {
    if (v.empty()) return;
    if (cudaMemcpyAsync(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice, s) !=
            cudaSuccess ||
        cudaStreamSynchronize(s) != cudaSuccess)
      throw std::runtime_error("upload failed");
  }
  std::vector<uint8_t> download(size_t n, cudaStream_t s) const {
    std::vector<uint8_t> v(n);
    if (cudaStreamSynchronize(s) != cudaSuccess ||
        (n && cudaMemcpy(v.data(), p, n, cudaMemcpyDeviceToHost) != cudaSuccess))
      throw std::runtime_error("download failed");
    return v;
  }
};

struct Shape {
  int64_t tokens = 4096;
  int64_t hidden = 7168;
  int top_k = 8;
  int experts = 256;
};

moekit_ep_config_t make_config(const Shape& sh, int n, moekit_ep_mode_t mode, int chunks) {
  moekit_ep_config_t c;
  if (moekit_ep_config_init(&c, sizeof(c)) != MOEKIT_STATUS_SUCCESS) std::exit(1);
  c.num_ranks = n;
  c.num_experts = sh.experts;
  c.top_k = sh.top_k;
  c.dtype = MOEKIT_DTYPE_BF16;
  c.mode = mode;
  c.num_chunks = chunks;
  c.hidden = sh.hidden;
  c.max_tokens = sh.tokens;
  c.capacity = 0;  // = max_tokens: never drops
  return c;
}

Routing make_uniform_routing(const Shape& sh, int n, int chunks, bool capacity, uint64_t seed) {
  RoutingShape s;
  s.num_ranks = n;
  s.num_experts = sh.experts;
  s.top_k = sh.top_k;
  s.num_chunks = chunks;
  s.capacity_mode = capacity;
  s.capacity = sh.tokens;
  s.num_tokens.assign(n, sh.tokens);
  std::mt19937_64 rng(seed);
  return make_routing(s, rng);
}

// Per-rank inputs of one shape: finite bf16 values of random sign, exponent and mantissa (never
// zeros), made with a cheap generator (hundreds of MB at the DeepSeek-V3 shape).
struct RankInputs {
  std::vector<std::vector<uint8_t>> x, partials;
};

std::vector<uint8_t> random_bf16(int64_t count, uint64_t seed) {
  std::vector<uint8_t> v(count * 2);
  uint64_t state = seed * 0x9e3779b97f4a7c15ULL + 1;
  for (int64_t i = 0; i < count; ++i) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    const uint32_t r = static_cast<uint32_t>(state >> 33);
    // sign | exponent 120 .. 127 (|v| in [2^-7, 2)) | 7 random mantissa bits
    const uint16_t b = static_cast<uint16_t>(((r & 1u) << 15) | ((120u + ((r >> 1) & 7u)) << 7) |
                                             ((r >> 4) & 0x7fu));
    std::memcpy(&v[i * 2], &b, 2);
  }
  return v;
}

RankInputs make_inputs(const Shape& sh, int n, const std::vector<int64_t>& recv_rows,
                       uint64_t seed) {
  RankInputs in;
  for (int r = 0; r < n; ++r) {
    in.x.push_back(random_bf16(sh.tokens * sh.hidden, seed * 131 + r));
    in.partials.push_back(random_bf16(recv_rows[r] * sh.hidden, seed * 137 + r + 7919));
  }
  return in;
}

#define RANK_OK(ctx, expr) EP_REQUIRE_OK(ctx, expr)

// ---- validation --------------------------------------------------------------------------------

void validate(int n, uint64_t seed) {
  Shape sh;
  sh.tokens = 300;
  sh.hidden = 264;
  for (moekit_ep_mode_t mode : {MOEKIT_EP_MODE_EXACT, MOEKIT_EP_MODE_CAPACITY}) {
    const int chunks = 3;
    const Routing routing =
        make_uniform_routing(sh, n, chunks, mode == MOEKIT_EP_MODE_CAPACITY, seed + 17);
    const moekit::ref::EpExchange x = moekit::ref::ep_exchange(routing.problem);
    std::vector<int64_t> recv_rows(n);
    for (int r = 0; r < n; ++r) recv_rows[r] = static_cast<int64_t>(x.rows[r].size());
    const RankInputs in = make_inputs(sh, n, recv_rows, seed + 17);
    std::vector<std::vector<float>> partial_values(n);
    for (int r = 0; r < n; ++r)
      partial_values[r] = moekit::test::unpack(MOEKIT_DTYPE_BF16, in.partials[r]);
    const moekit_ep_config_t cfg = make_config(sh, n, mode, chunks);
    const size_t row_bytes = sh.hidden * 2;
    const std::vector<std::string> failures = run_ranks(n, [&](RankContext& ctx) {
      const int r = ctx.rank;
      cudaStream_t s = ctx.stream;
      const int64_t T = sh.tokens, K = sh.top_k, R = recv_rows[r];
      moekit_ep_handle_t h = nullptr;
      RANK_OK(ctx, moekit_ep_create(&cfg, ctx.comm, &h));
      size_t layout_bytes = 0, host_count = 0, ws_bytes = 0;
      RANK_OK(ctx, moekit_ep_layout_size(&cfg, &layout_bytes, &host_count));
      std::vector<int64_t> hl(host_count);
      int64_t* hlp = host_count ? hl.data() : nullptr;
      DevBuf layout(layout_bytes), idx(T * K * 4), w(T * K * 4), xb(T * row_bytes),
          rx(R * row_bytes), ridx(R * K * 4), rw(R * K * 4), part(R * row_bytes), y(T * row_bytes);
      idx.upload(routing.problem.indices[r], s);
      w.upload(routing.weights[r], s);
      xb.upload(in.x[r], s);
      part.upload(in.partials[r], s);
      ctx.sync(__LINE__);  // allocations end before the first collective (tests/ep/multi_gpu.hpp)
      int64_t rows = 0;
      RANK_OK(ctx, moekit_ep_layout(h, T, idx.as<int32_t>(), nullptr, layout.p, layout_bytes, hlp,
                                    &rows, nullptr, s));
      EP_CHECK(ctx, rows == R, "rows " << rows << " != " << R);
      RANK_OK(ctx, moekit_ep_workspace_size(&cfg, hlp, &ws_bytes));
      DevBuf ws(ws_bytes);
      ctx.sync(__LINE__);  // and again before the next one
      RANK_OK(ctx, moekit_ep_dispatch(h, T, layout.p, hlp, xb.p, idx.as<int32_t>(), w.as<float>(),
                                      rx.p, ridx.as<int32_t>(), rw.as<float>(), nullptr, nullptr,
                                      ws.p, ws_bytes, s));
      RANK_OK(ctx, moekit_ep_combine(h, T, layout.p, hlp, part.p, y.p, ws.p, ws_bytes, s));
      const std::vector<uint8_t> got_x = rx.download(R * row_bytes, s);
      const std::vector<uint8_t> got_y = y.download(T * row_bytes, s);
      int bad = 0;
      for (int64_t i = 0; i < R; ++i) {
        const moekit::ref::EpRecvRow want = x.rows[r][i];
        if (want.src < 0) continue;
        bad += std::memcmp(&got_x[i * row_bytes], &in.x[want.src][want.token * row_bytes],
                           row_bytes) != 0;
      }
      EP_CHECK(ctx, bad == 0, bad << " dispatched rows differ from the reference");
      const std::vector<uint8_t> want_y = moekit::test::pack(
          MOEKIT_DTYPE_BF16,
          moekit::ref::ep_combine(routing.problem, x, r, sh.hidden, partial_values));
      EP_CHECK(ctx, got_y == want_y, "combine differs from the rank-ordered fp32 sum");
      moekit_ep_destroy(h);
    });
    if (!failures.empty()) {
      for (const std::string& f : failures) std::fprintf(stderr, "%s\n", f.c_str());
      std::fprintf(stderr, "validation failed (%s mode): nothing timed\n",
                   mode == MOEKIT_EP_MODE_EXACT ? "exact" : "capacity");
      std::exit(1);
    }
  }
  std::printf("validation: dispatch rows and combine sums match the reference (exact and "
              "capacity, %d ranks)\n",
              n);
}

// ---- timing ------------------------------------------------------------------------------------

double median(std::vector<double> v) { return moekit::bench::summarise(std::move(v)).median_us; }

struct EpTiming {
  std::vector<double> layout_us, dispatch_us, combine_us;  // per rank medians
};

// Each rank thread makes its own inputs (random_bf16, seeded by rank), in parallel.
EpTiming time_ep(const Shape& sh, int n, moekit_ep_mode_t mode, int chunks,
                 const Routing& routing, const std::vector<int64_t>& recv_rows, uint64_t seed,
                 int warmup, int repeats) {
  EpTiming out;
  out.layout_us.assign(n, 0);
  out.dispatch_us.assign(n, 0);
  out.combine_us.assign(n, 0);
  const moekit_ep_config_t cfg = make_config(sh, n, mode, chunks);
  const size_t row_bytes = sh.hidden * 2;
  const std::vector<std::string> failures = run_ranks(
      n,
      [&](RankContext& ctx) {
        const int r = ctx.rank;
        cudaStream_t s = ctx.stream;
        const int64_t T = sh.tokens, K = sh.top_k, R = recv_rows[r];
        moekit_ep_handle_t h = nullptr;
        RANK_OK(ctx, moekit_ep_create(&cfg, ctx.comm, &h));
        size_t layout_bytes = 0, host_count = 0, ws_bytes = 0;
        RANK_OK(ctx, moekit_ep_layout_size(&cfg, &layout_bytes, &host_count));
        RANK_OK(ctx, moekit_ep_workspace_size(&cfg, nullptr, &ws_bytes));  // worst case: fixed
        std::vector<int64_t> hl(host_count);
        int64_t* hlp = host_count ? hl.data() : nullptr;
        DevBuf layout(layout_bytes), idx(T * K * 4), w(T * K * 4), xb(T * row_bytes),
            rx(R * row_bytes), ridx(R * K * 4), rw(R * K * 4), part(R * row_bytes),
            y(T * row_bytes), ws(ws_bytes);
        idx.upload(routing.problem.indices[r], s);
        w.upload(routing.weights[r], s);
        xb.upload(random_bf16(T * sh.hidden, seed * 131 + r), s);
        part.upload(random_bf16(R * sh.hidden, seed * 137 + r + 7919), s);
        cudaEvent_t ev[4];
        for (auto& e : ev) EP_CUDA_OK(ctx, cudaEventCreate(&e));
        std::vector<double> lt, dt, ct;
        for (int i = 0; i < warmup + repeats; ++i) {
          ctx.sync();
          EP_CUDA_OK(ctx, cudaEventRecord(ev[0], s));
          int64_t rows = 0;
          RANK_OK(ctx, moekit_ep_layout(h, T, idx.as<int32_t>(), nullptr, layout.p, layout_bytes,
                                        hlp, &rows, nullptr, s));
          EP_CUDA_OK(ctx, cudaEventRecord(ev[1], s));
          RANK_OK(ctx, moekit_ep_dispatch(h, T, layout.p, hlp, xb.p, idx.as<int32_t>(),
                                          w.as<float>(), rx.p, ridx.as<int32_t>(), rw.as<float>(),
                                          nullptr, nullptr, ws.p, ws_bytes, s));
          EP_CUDA_OK(ctx, cudaEventRecord(ev[2], s));
          RANK_OK(ctx, moekit_ep_combine(h, T, layout.p, hlp, part.p, y.p, ws.p, ws_bytes, s));
          EP_CUDA_OK(ctx, cudaEventRecord(ev[3], s));
          EP_CUDA_OK(ctx, cudaEventSynchronize(ev[3]));
          if (rows != R) throw std::runtime_error("received rows differ from the reference");
          if (i < warmup) continue;
          float ms[3];
          for (int k = 0; k < 3; ++k) EP_CUDA_OK(ctx, cudaEventElapsedTime(&ms[k], ev[k], ev[k + 1]));
          lt.push_back(1000.0 * ms[0]);
          dt.push_back(1000.0 * ms[1]);
          ct.push_back(1000.0 * ms[2]);
        }
        out.layout_us[r] = median(lt);
        out.dispatch_us[r] = median(dt);
        out.combine_us[r] = median(ct);
        for (auto& e : ev) cudaEventDestroy(e);
        moekit_ep_destroy(h);
      },
      300);
  if (!failures.empty()) {
    for (const std::string& f : failures) std::fprintf(stderr, "%s\n", f.c_str());
    std::exit(1);
  }
  return out;
}

// NCCL moving bytes[r][p] from every rank r to every peer p != r in one group of send/recv (or
// with ncclAlltoAll when `alltoall`, bytes_per_peer each). Returns per-rank median microseconds.
std::vector<double> time_nccl(int n, bool alltoall, size_t bytes_per_peer,
                              const std::vector<std::vector<size_t>>& bytes, int warmup,
                              int repeats) {
  std::vector<double> out(n, 0);
  const std::vector<std::string> failures = run_ranks(
      n,
      [&](RankContext& ctx) {
        const int r = ctx.rank;
        cudaStream_t s = ctx.stream;
        size_t send_total = 0, recv_total = 0;
        std::vector<size_t> send_off(n), recv_off(n);
        for (int p = 0; p < n; ++p) {
          const size_t sb = alltoall ? bytes_per_peer : (p == r ? 0 : bytes[r][p]);
          const size_t rb = alltoall ? bytes_per_peer : (p == r ? 0 : bytes[p][r]);
          send_off[p] = send_total;
          recv_off[p] = recv_total;
          send_total += sb;
          recv_total += rb;
        }
        DevBuf sendbuf(send_total), recvbuf(recv_total);
        EP_CUDA_OK(ctx, cudaMemsetAsync(sendbuf.p, 0x3c, send_total, s));
        cudaEvent_t e0, e1;
        EP_CUDA_OK(ctx, cudaEventCreate(&e0));
        EP_CUDA_OK(ctx, cudaEventCreate(&e1));
        std::vector<double> us;
        for (int i = 0; i < warmup + repeats; ++i) {
          ctx.sync();
          EP_CUDA_OK(ctx, cudaEventRecord(e0, s));
          ncclResult_t res = ncclSuccess;
          if (alltoall) {
            res = ncclAlltoAll(sendbuf.p, recvbuf.p, bytes_per_peer, ncclUint8, ctx.comm, s);
          } else {
            ncclGroupStart();
            for (int p = 0; p < n; ++p) {
              if (p == r) continue;
              if (bytes[r][p] > 0)
                ncclSend(static_cast<char*>(sendbuf.p) + send_off[p], bytes[r][p], ncclUint8, p,
                         ctx.comm, s);
              if (bytes[p][r] > 0)
                ncclRecv(static_cast<char*>(recvbuf.p) + recv_off[p], bytes[p][r], ncclUint8, p,
                         ctx.comm, s);
            }
            res = ncclGroupEnd();
          }
          if (res != ncclSuccess) throw std::runtime_error(ncclGetErrorString(res));
          EP_CUDA_OK(ctx, cudaEventRecord(e1, s));
          EP_CUDA_OK(ctx, cudaEventSynchronize(e1));
          float ms = 0;
          EP_CUDA_OK(ctx, cudaEventElapsedTime(&ms, e0, e1));
          if (i >= warmup) us.push_back(1000.0 * ms);
        }
        out[r] = median(us);
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
      },
      300);
  if (!failures.empty()) {
    for (const std::string& f : failures) std::fprintf(stderr, "%s\n", f.c_str());
    std::exit(1);
  }
  return out;
}

double max_of(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }

double gbps(double bytes, double us) { return us > 0 ? bytes / (us * 1e-6) / 1e9 : 0; }

// {"0": v0, "1": v1, ...}: one value per rank.
Json per_rank(const std::vector<double>& v) {
  Json o = Json::object();
  for (size_t r = 0; r < v.size(); ++r) o.set(std::to_string(r), v[r]);
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  keep_nvls_off();
  moekit::bench::Args args(argc, argv);
  if (args.has("help")) {
    std::printf("moekit-bench-ep [--preset=deepseek-v3] [--tokens=] [--hidden=] [--top-k=] "
                "[--experts=] [--gpus=] [--modes=exact,capacity] [--chunks=1,2,4,8] [--warmup=] "
                "[--repeats=] [--seed=] [--json=PATH | --out=PATH]\n");
    return 0;
  }
  // "all" (what scripts/gpu-check.sh passes every benchmark) is the one preset there is.
  const std::string preset = args.get("preset", "deepseek-v3");
  if (preset != "deepseek-v3" && preset != "all") {
    std::fprintf(stderr, "unknown --preset=%s (known: deepseek-v3, all)\n", preset.c_str());
    return 2;
  }
  Shape sh;
  sh.tokens = args.get_int("tokens", sh.tokens);
  sh.hidden = args.get_int("hidden", sh.hidden);
  sh.top_k = static_cast<int>(args.get_int("top-k", sh.top_k));
  sh.experts = static_cast<int>(args.get_int("experts", sh.experts));
  const int devices = device_count();
  const int n = static_cast<int>(args.get_int("gpus", devices));
  const int warmup = static_cast<int>(args.get_int("warmup", 5));
  const int repeats = static_cast<int>(args.get_int("repeats", 20));
  const uint64_t seed = static_cast<uint64_t>(args.get_int("seed", 1));
  std::vector<int> chunk_list;
  for (const std::string& c : args.get_list("chunks", "1,2,4,8")) chunk_list.push_back(std::atoi(c.c_str()));
  const std::string modes = args.get("modes", "exact,capacity");
  const std::string json_path = args.get("json", args.get("out", ""));
  if (n < 2 || n > devices) {
    std::fprintf(stderr, "moekit-bench-ep needs 2 .. %d GPUs (asked for %d)\n", devices, n);
    return 2;
  }
  if (sh.experts % n != 0) {
    std::fprintf(stderr, "--experts=%d is not a multiple of %d GPUs\n", sh.experts, n);
    return 2;
  }
  int32_t nccl_version = 0;
  if (moekit_ep_nccl_version(&nccl_version) != MOEKIT_STATUS_SUCCESS) {
    std::fprintf(stderr, "%s\n", moekit_get_last_error());
    return 2;
  }
  cudaSetDevice(0);
  const std::string gpu = moekit::bench::device_description();
  std::printf("moekit-bench-ep: %d x %s, NCCL %d, NCCL_NVLS_ENABLE=%s\n", n, gpu.c_str(),
              nccl_version, std::getenv("NCCL_NVLS_ENABLE"));
  std::printf("shape: T=%lld per rank, H=%lld bf16, K=%d, E=%d\n",
              static_cast<long long>(sh.tokens), static_cast<long long>(sh.hidden), sh.top_k,
              sh.experts);

  validate(n, seed);

  // Routing (uniform, fixed seed) and the bytes it moves, from the reference.
  const Routing routing = make_uniform_routing(sh, n, 1, false, seed);
  const moekit::ref::EpExchange x = moekit::ref::ep_exchange(routing.problem);
  const size_t row_bytes = sh.hidden * 2;
  const size_t meta_row_bytes = (2 * sh.top_k + 1) * 4;
  std::vector<std::vector<size_t>> pair_bytes(n, std::vector<size_t>(n, 0));
  std::vector<int64_t> recv_exact(n);
  double payload_mean = 0, rows_remote_mean = 0;
  for (int r = 0; r < n; ++r) {
    recv_exact[r] = static_cast<int64_t>(x.rows[r].size());
    for (int p = 0; p < n; ++p) {
      if (p == r) continue;
      pair_bytes[r][p] = static_cast<size_t>(x.sent[r][p]) * row_bytes;
      payload_mean += pair_bytes[r][p];
      rows_remote_mean += x.sent[r][p];
    }
  }
  payload_mean /= n;
  rows_remote_mean /= n;
  const double capacity_payload = static_cast<double>(n - 1) * sh.tokens * row_bytes;
  std::printf("routing: %.1f remote rows per rank (%.3f of T per peer), payload %.1f MB per rank\n",
              rows_remote_mean, rows_remote_mean / (n - 1) / sh.tokens, payload_mean / 1e6);

  // NCCL baselines, same bytes, same run.
  const size_t a2a_peer = static_cast<size_t>(payload_mean / (n - 1) + 15) / 16 * 16;
  const std::vector<double> a2a = time_nccl(n, true, a2a_peer, pair_bytes, warmup, repeats);
  const std::vector<double> p2p = time_nccl(n, false, 0, pair_bytes, warmup, repeats);
  const size_t a2a_cap_peer = static_cast<size_t>(sh.tokens) * row_bytes;
  const std::vector<double> a2a_cap = time_nccl(n, true, a2a_cap_peer, pair_bytes, warmup, repeats);
  const double a2a_bw = gbps(payload_mean, max_of(a2a));
  const double a2a_cap_bw = gbps(capacity_payload, max_of(a2a_cap));
  const double p2p_bw = gbps(payload_mean, max_of(p2p));

  Json results = Json::array();
  std::printf("\n%-9s %6s %10s %11s %11s %12s %12s %9s %9s\n", "mode", "chunks", "layout_us",
              "dispatch_us", "combine_us", "dispatch_GBs", "combine_GBs", "disp/a2a", "comb/a2a");
  std::printf("%-9s %6s %10s %11.1f %11s %12.1f %12s\n", "nccl_a2a", "-", "-", max_of(a2a), "-",
              a2a_bw, "-");
  std::printf("%-9s %6s %10s %11.1f %11s %12.1f %12s\n", "nccl_p2p", "-", "-", max_of(p2p), "-",
              p2p_bw, "-");
  std::printf("%-9s %6s %10s %11.1f %11s %12.1f %12s   (capacity-mode bytes)\n", "nccl_a2a", "-",
              "-", max_of(a2a_cap), "-", a2a_cap_bw, "-");
  double best_dispatch_fraction = 0, best_combine_fraction = 0;
  int best_chunks = 0;
  for (const char* mode_name : {"exact", "capacity"}) {
    if (modes.find(mode_name) == std::string::npos) continue;
    const bool capacity = std::strcmp(mode_name, "capacity") == 0;
    for (int chunks : chunk_list) {
      if (chunks < 1 || chunks > MOEKIT_EP_MAX_CHUNKS) continue;
      // Capacity blocks of ceil(T / C) rows: received rows = n C ceil(T / C).
      std::vector<int64_t> recv_rows = recv_exact;
      if (capacity)
        for (int r = 0; r < n; ++r)
          recv_rows[r] = static_cast<int64_t>(n) * chunks * ((sh.tokens + chunks - 1) / chunks);
      const EpTiming t = time_ep(sh, n, capacity ? MOEKIT_EP_MODE_CAPACITY : MOEKIT_EP_MODE_EXACT,
                                 chunks, routing, recv_rows, seed, warmup, repeats);
      const double bytes = capacity ? static_cast<double>(n - 1) * chunks *
                                          ((sh.tokens + chunks - 1) / chunks) * row_bytes
                                    : payload_mean;
      const double base_bw = capacity ? a2a_cap_bw : a2a_bw;
      const double d_bw = gbps(bytes, max_of(t.dispatch_us));
      const double c_bw = gbps(bytes, max_of(t.combine_us));
      std::printf("%-9s %6d %10.1f %11.1f %11.1f %12.1f %12.1f %9.3f %9.3f\n", mode_name, chunks,
                  max_of(t.layout_us), max_of(t.dispatch_us), max_of(t.combine_us), d_bw, c_bw,
                  d_bw / base_bw, c_bw / base_bw);
      if (!capacity && d_bw / base_bw + c_bw / base_bw >
                           best_dispatch_fraction + best_combine_fraction) {
        best_dispatch_fraction = d_bw / base_bw;
        best_combine_fraction = c_bw / base_bw;
        best_chunks = chunks;
      }
      Json row = Json::object();
      row.set("mode", mode_name)
          .set("chunks", chunks)
          .set("layout_us", max_of(t.layout_us))
          .set("dispatch_us", max_of(t.dispatch_us))
          .set("combine_us", max_of(t.combine_us))
          .set("payload_bytes_per_rank", bytes)
          .set("meta_bytes_per_rank",
               (capacity ? static_cast<double>(n - 1) * chunks * ((sh.tokens + chunks - 1) / chunks)
                         : rows_remote_mean) *
                   meta_row_bytes)
          .set("dispatch_busbw_GBps", d_bw)
          .set("combine_busbw_GBps", c_bw)
          .set("dispatch_fraction_of_alltoall", d_bw / base_bw)
          .set("combine_fraction_of_alltoall", c_bw / base_bw)
          .set("dispatch_us_per_rank", per_rank(t.dispatch_us))
          .set("combine_us_per_rank", per_rank(t.combine_us))
          .set("layout_us_per_rank", per_rank(t.layout_us));
      results.push(row);
    }
  }
  if (best_chunks > 0)
    std::printf("\nexact mode, best chunks = %d: dispatch %.1f%%, combine %.1f%% of the all-to-all "
                "bus bandwidth (bar: 80%%)\n",
                best_chunks, 100 * best_dispatch_fraction, 100 * best_combine_fraction);

  if (!json_path.empty()) {
    Json j = Json::object();
    j.set("benchmark", "ep")
        .set("tool", "moekit-bench-ep")
        .set("gpu", gpu)
        .set("num_gpus", n)
        .set("nccl_version", static_cast<int64_t>(nccl_version))
        .set("commit", moekit::bench::build_commit())
        .set("date", moekit::bench::utc_now())
        .set("nvls_enable", std::getenv("NCCL_NVLS_ENABLE") ? std::getenv("NCCL_NVLS_ENABLE") : "")
        .set("shape", Json::object()
                          .set("tokens_per_rank", sh.tokens)
                          .set("hidden", sh.hidden)
                          .set("dtype", "bf16")
                          .set("top_k", sh.top_k)
                          .set("experts", sh.experts)
                          .set("routing", "uniform random, K distinct experts")
                          .set("seed", static_cast<int64_t>(seed)))
        .set("warmup", warmup)
        .set("repeats", repeats)
        .set("remote_rows_per_rank_mean", rows_remote_mean)
        .set("payload_bytes_per_rank_mean", payload_mean)
        .set("bandwidth_definition",
             "bus bandwidth = mean remote payload bytes per rank / slowest rank's median time "
             "(nccl-tests all-to-all busbw); fraction = moekit busbw / ncclAlltoAll busbw of the "
             "same bytes")
        .set("nccl_alltoall", Json::object()
                                  .set("bytes_per_peer", static_cast<int64_t>(a2a_peer))
                                  .set("us", max_of(a2a))
                                  .set("busbw_GBps", a2a_bw))
        .set("nccl_alltoall_capacity_bytes", Json::object()
                                                 .set("bytes_per_peer",
                                                      static_cast<int64_t>(a2a_cap_peer))
                                                 .set("us", max_of(a2a_cap))
                                                 .set("busbw_GBps", a2a_cap_bw))
        .set("nccl_p2p_same_split",
             Json::object().set("us", max_of(p2p)).set("busbw_GBps", p2p_bw))
        .set("results", results)
        .set("best_exact", Json::object()
                               .set("chunks", best_chunks)
                               .set("dispatch_fraction_of_alltoall", best_dispatch_fraction)
                               .set("combine_fraction_of_alltoall", best_combine_fraction));
    if (!moekit::bench::write_file(json_path, j.dump())) {
      std::fprintf(stderr, "cannot write %s\n", json_path.c_str());
      return 1;
    }
    std::printf("wrote %s\n", json_path.c_str());
  }
  destroy_communicators();
  return 0;
}
