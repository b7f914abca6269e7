// EP on 2, 4 and all GPUs (and 1, the path with no peer), one process, one thread per rank
// (tests/ep/multi_gpu.hpp). Smoke steps first (ep = 2: layout, then dispatch of a few tokens, with
// and without a rank that has none), so a hang is met at the smallest step. Before a problem's
// ranks start, the NCCL groups every rank will issue are checked pair by pair on the host
// (tests/ep/ep_script.hpp): a mismatch fails the case instead of hanging. Bodies allocate and free
// only in the phases run_ranks allows. Every rank compares its own outputs with the CPU reference
// of the global problem (tests/reference/ep_ref.hpp):
//  - dispatch delivers exactly the expected rows (bitwise), ids, weights, source tokens and mask,
//    in the documented order; nothing is written outside the outputs (poisoned guard regions);
//  - combine equals the rank-ordered fp32 sum, bitwise; gap rows (NaN) are never summed;
//  - dispatch backward is a combine and combine backward a dispatch (bitwise duality), with the
//    weight gradients taken from the owner rank;
//  - capacity overflow is counted exactly and never written out of bounds;
//  - tokens with no remote expert never leave their rank;
//  - repeated runs are bitwise identical; capacity mode replays from a CUDA graph with new
//    routing; exact mode refuses to be captured and enqueues nothing;
//  - an expert-parallel routed computation (dispatch, local plan, permute, a per-expert op,
//    combine, and the whole backward) equals the same computation on one GPU;
//  - the load and aux-statistics reductions are exact / rank-ordered;
//  - bad arguments leave outputs untouched; ranks with different configurations are detected.
#if MOEKIT_EP_TEST_HAVE_NCCL

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/ep.h"
#include "moekit/tokens.h"
#include "tests/ep/ep_problem.hpp"
#include "tests/ep/ep_script.hpp"
#include "tests/ep/ep_test_kernels.hpp"
#include "tests/ep/multi_gpu.hpp"
#include "tests/reference/ep_ref.hpp"
#include "tests/support/catch.hpp"
#include "tests/support/device.hpp"
#include "tests/support/numeric.hpp"
#include "tests/support/random.hpp"

namespace {

using moekit::ref::EpExchange;
using moekit::ref::EpProblem;
using moekit::test::DeviceBuffer;
using namespace moekit::test::ep;

constexpr size_t kGuardBytes = 4096;
// Not 0xff: -1 is a legitimate value here (gap rows' ids and source tokens), so an unwritten -1
// must not pass for a written one. 0xa7a7a7a7 is neither -1, 0, a small index nor NaN.
constexpr uint8_t kPoison = 0xa7;

// ---- device buffers with guard regions, stream-ordered --------------------------------------

// `bytes` of payload between two poisoned guard regions; everything starts poisoned.
class Guarded {
 public:
  Guarded() = default;
  // Allocates (cudaMalloc): only inside an allocation phase (the rule in multi_gpu.hpp).
  Guarded(size_t bytes, cudaStream_t stream) : bytes_(bytes), buffer_(allocation(bytes)) {
    poison(stream);
  }
  void* get() const { return bytes_ == 0 ? nullptr : buffer_.get<uint8_t>() + kGuardBytes; }
  template <class T>
  T* as() const {
    return static_cast<T*>(get());
  }
  size_t bytes() const { return bytes_; }
  void poison(cudaStream_t stream) {
    crumb_step("Guarded::poison: cudaMemsetAsync", __LINE__);
    if (cudaMemsetAsync(buffer_.get(), kPoison, buffer_.bytes(), stream) != cudaSuccess)
      throw std::runtime_error("cudaMemsetAsync failed");
  }
  template <class T>
  void upload(const std::vector<T>& host, cudaStream_t stream) {
    if (host.size() * sizeof(T) != bytes_) throw std::runtime_error("upload size mismatch");
    if (bytes_ == 0) return;
    crumb_step("Guarded::upload: cudaMemcpyAsync + cudaStreamSynchronize", __LINE__);
    if (cudaMemcpyAsync(get(), host.data(), bytes_, cudaMemcpyHostToDevice, stream) !=
            cudaSuccess ||
        cudaStreamSynchronize(stream) != cudaSuccess)
      throw std::runtime_error("upload failed");
  }
  // Payload and guards (the stream is synchronised first).
  std::vector<uint8_t> all(cudaStream_t stream) const {
    std::vector<uint8_t> host(buffer_.bytes());
    crumb_step("Guarded download: cudaStreamSynchronize + cudaMemcpy", __LINE__);
    if (cudaStreamSynchronize(stream) != cudaSuccess ||
        cudaMemcpy(host.data(), buffer_.get(), host.size(), cudaMemcpyDeviceToHost) != cudaSuccess)
      throw std::runtime_error("download failed");
    return host;
  }
  template <class T>
  std::vector<T> download(cudaStream_t stream) const {
    const std::vector<uint8_t> a = all(stream);
    std::vector<T> out(bytes_ / sizeof(T));
    if (!out.empty()) std::memcpy(out.data(), a.data() + kGuardBytes, bytes_);
    return out;
  }
  bool guards_intact(cudaStream_t stream) const {
    const std::vector<uint8_t> a = all(stream);
    for (size_t i = 0; i < kGuardBytes; ++i)
      if (a[i] != kPoison || a[kGuardBytes + bytes_ + i] != kPoison) return false;
    return true;
  }
  bool untouched(cudaStream_t stream) const {
    for (uint8_t b : all(stream))
      if (b != kPoison) return false;
    return true;
  }

 private:
  static size_t allocation(size_t bytes) {
    crumb_step("Guarded: cudaMalloc", __LINE__);
    return bytes + 2 * kGuardBytes;
  }
  size_t bytes_ = 0;
  DeviceBuffer buffer_;
};

size_t elem_size(moekit_dtype_t d) { return d == MOEKIT_DTYPE_F32 ? 4 : 2; }

// Random bit patterns of `count` elements of dtype (NaNs included: moved rows are compared
// bitwise).
std::vector<uint8_t> random_bits(std::mt19937_64& rng, size_t bytes) {
  std::vector<uint8_t> v(bytes);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

// Finite random values rounded to dtype, as bytes of dtype.
std::vector<float> random_values(std::mt19937_64& rng, size_t count, moekit_dtype_t dtype) {
  return moekit::test::rounded(dtype, moekit::test::uniform(rng, count, -2.0f, 2.0f));
}

// ---- one problem, all ranks ------------------------------------------------------------------

struct Case {
  const char* name;
  int experts_per_rank;
  int top_k;
  int64_t hidden;
  moekit_dtype_t dtype;
  int32_t combine_dtype;  // -1 = dtype
  moekit_ep_mode_t mode;
  int chunks;
  int64_t capacity;       // config value (0 = max_tokens)
  std::vector<int64_t> tokens;  // cycled over the ranks
  double local_only, mask, invalid, duplicate;
};

// The global problem and every rank's inputs and reference outputs, built on the main thread.
struct Global {
  Case c;
  int n = 0;
  moekit_ep_config_t config{};
  moekit_dtype_t combine_dtype = MOEKIT_DTYPE_BF16;
  Routing routing;
  EpExchange x;
  std::vector<int64_t> recv_rows;                 // per rank
  std::vector<std::vector<uint8_t>> xrows;        // [T, H] dtype bits
  std::vector<std::vector<uint8_t>> grad_y;       // [T, H] dtype bits
  std::vector<std::vector<float>> partials;       // [R, H] values (NaN in gaps)
  std::vector<std::vector<float>> grad_recv_x;    // [R, H] values (NaN in gaps)
  std::vector<std::vector<float>> grad_recv_w;    // [R, K] (NaN in gaps)
};

moekit_ep_config_t make_config(const Case& c, int n, int64_t max_tokens) {
  moekit_ep_config_t cfg;
  if (moekit_ep_config_init(&cfg, sizeof(cfg)) != MOEKIT_STATUS_SUCCESS)
    throw std::runtime_error("config_init failed");
  cfg.num_ranks = n;
  cfg.num_experts = c.experts_per_rank * n;
  cfg.top_k = c.top_k;
  cfg.dtype = c.dtype;
  cfg.combine_dtype = c.combine_dtype;
  cfg.mode = c.mode;
  cfg.num_chunks = c.chunks;
  cfg.hidden = c.hidden;
  cfg.max_tokens = max_tokens;
  cfg.capacity = c.capacity;
  return cfg;
}

Global make_global(const Case& c, int n, uint64_t salt) {
  Global g;
  g.c = c;
  g.n = n;
  auto rng = moekit::test::make_rng(salt * 1000003 + static_cast<uint64_t>(n));
  RoutingShape s;
  s.num_ranks = n;
  s.num_experts = c.experts_per_rank * n;
  s.top_k = c.top_k;
  s.num_chunks = c.chunks;
  s.capacity_mode = c.mode == MOEKIT_EP_MODE_CAPACITY;
  for (int r = 0; r < n; ++r) s.num_tokens.push_back(c.tokens[r % c.tokens.size()]);
  const int64_t max_tokens = *std::max_element(s.num_tokens.begin(), s.num_tokens.end());
  s.capacity = c.capacity > 0 ? c.capacity : max_tokens;
  s.local_only_fraction = c.local_only;
  s.mask_fraction = c.mask;
  s.invalid_fraction = c.invalid;
  s.duplicate_fraction = c.duplicate;
  g.routing = make_routing(s, rng);
  g.x = moekit::ref::ep_exchange(g.routing.problem);
  g.config = make_config(c, n, max_tokens);
  g.combine_dtype = c.combine_dtype < 0 ? c.dtype : static_cast<moekit_dtype_t>(c.combine_dtype);
  const int64_t H = c.hidden, K = c.top_k;
  for (int r = 0; r < n; ++r) {
    const int64_t T = s.num_tokens[r];
    const int64_t R = static_cast<int64_t>(g.x.rows[r].size());
    g.recv_rows.push_back(R);
    g.xrows.push_back(random_bits(rng, T * H * elem_size(c.dtype)));
    g.grad_y.push_back(random_bits(rng, T * H * elem_size(c.dtype)));
    std::vector<float> p = random_values(rng, R * H, g.combine_dtype);
    std::vector<float> gx = random_values(rng, R * H, c.dtype);
    std::vector<float> gw = moekit::test::uniform(rng, R * K, -1.0f, 1.0f);
    for (int64_t i = 0; i < R; ++i) {
      if (g.x.rows[r][i].src >= 0) continue;  // a gap: never summed
      for (int64_t h = 0; h < H; ++h) p[i * H + h] = gx[i * H + h] = NAN;
      for (int64_t k = 0; k < K; ++k) gw[i * K + k] = NAN;
    }
    g.partials.push_back(p);
    g.grad_recv_x.push_back(gx);
    g.grad_recv_w.push_back(gw);
  }
  return g;
}

// One rank's handle and layout. Creating and destroying it allocates and frees (pinned staging,
// the layout buffer, the workspace): only inside an allocation phase (multi_gpu.hpp).
struct RankEp {
  moekit_ep_handle_t handle = nullptr;
  DeviceBuffer layout;
  size_t layout_bytes = 0;
  std::vector<int64_t> host_layout;
  int64_t recv_rows = 0;
  DeviceBuffer workspace;
  size_t workspace_bytes = 0;
  ~RankEp() {
    crumb_step("RankEp: moekit_ep_destroy and cudaFree", __LINE__);
    moekit_ep_destroy(handle);
  }
  int64_t* hl() { return host_layout.empty() ? nullptr : host_layout.data(); }
};

void create_rank_ep(RankContext& ctx, const moekit_ep_config_t& cfg, RankEp& e) {
  EP_REQUIRE_OK(ctx, moekit_ep_create(&cfg, ctx.comm, &e.handle));
  size_t host_count = 0;
  EP_REQUIRE_OK(ctx, moekit_ep_layout_size(&cfg, &e.layout_bytes, &host_count));
  crumb_step("layout buffer: cudaMalloc", __LINE__);
  e.layout = DeviceBuffer(e.layout_bytes);
  e.host_layout.assign(host_count, 0);
}

// Layout, then a workspace of exactly the size the layout needs. The workspace's cudaMalloc is an
// allocation phase after the layout's collective (which every rank has issued once this rank's
// layout returns): the caller ends it with ctx.sync() before its next collective.
void run_layout(RankContext& ctx, const moekit_ep_config_t& cfg, RankEp& e, int64_t T,
                const int32_t* indices, const uint8_t* mask, int32_t* dropped) {
  EP_REQUIRE_OK(ctx, moekit_ep_layout(e.handle, T, indices, mask, e.layout.get(), e.layout_bytes,
                                      e.hl(), &e.recv_rows, dropped, ctx.stream));
  EP_REQUIRE_OK(ctx, moekit_ep_workspace_size(&cfg, e.hl(), &e.workspace_bytes));
  crumb_step("workspace: cudaMalloc", __LINE__);
  e.workspace = DeviceBuffer(e.workspace_bytes);
}

std::vector<uint8_t> to_dtype_bytes(moekit_dtype_t dtype, const std::vector<float>& v) {
  return moekit::test::pack(dtype, v);
}

// Outputs of one pass of dispatch, combine and both backwards (for the determinism check).
struct PassOutputs {
  std::vector<uint8_t> recv_x, recv_idx, recv_w, recv_src, recv_mask, y, grad_x, grad_w,
      grad_partials;
  // The outputs that differ from o's, by name ("" when every byte agrees).
  std::string differing(const PassOutputs& o) const {
    std::string names;
    auto add = [&](const char* name, const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
      if (a != b) names += names.empty() ? name : std::string(", ") + name;
    };
    add("recv_x", recv_x, o.recv_x);
    add("recv_indices", recv_idx, o.recv_idx);
    add("recv_weights", recv_w, o.recv_w);
    add("recv_src_token", recv_src, o.recv_src);
    add("recv_mask", recv_mask, o.recv_mask);
    add("y", y, o.y);
    add("grad_x", grad_x, o.grad_x);
    add("grad_weights", grad_w, o.grad_w);
    add("grad_partials", grad_partials, o.grad_partials);
    return names;
  }
};

// Every check of one rank for one problem. Runs the same collectives on every rank, in the order
// check_rank_calls (tests/ep/ep_script.hpp) lists, which run_case checks on the host first.
// Allocation phases (multi_gpu.hpp): everything before the layout, then the workspace and the
// row buffers after it; both end with ctx.sync(). The two runs reuse their buffers (poisoned again)
// so that nothing is allocated or freed between collectives.
void check_rank(RankContext& ctx, const Global& g) {
  const int r = ctx.rank;
  const EpProblem& p = g.routing.problem;
  const Case& c = g.c;
  const int64_t T = p.num_tokens[r], H = c.hidden, K = c.top_k;
  const int64_t R = g.recv_rows[r];
  const size_t row_bytes = H * elem_size(c.dtype);
  cudaStream_t s = ctx.stream;

  RankEp e;
  create_rank_ep(ctx, g.config, e);
  Guarded indices(T * K * 4, s), weights(T * K * 4, s), x(T * row_bytes, s), mask(
      p.masks[r].empty() ? 0 : T, s), dropped(4, s), grad_y(T * row_bytes, s);
  indices.upload(p.indices[r], s);
  weights.upload(g.routing.weights[r], s);
  x.upload(g.xrows[r], s);
  if (!p.masks[r].empty()) mask.upload(p.masks[r], s);
  grad_y.upload(g.grad_y[r], s);
  ctx.sync(__LINE__);  // end of the first allocation phase
  run_layout(ctx, g.config, e, T, indices.as<int32_t>(), mask.as<uint8_t>(), dropped.as<int32_t>());

  EP_CHECK(ctx, e.recv_rows == R, "num_recv_rows " << e.recv_rows << " != reference " << R);
  EP_CHECK(ctx, dropped.download<int32_t>(s)[0] == g.x.dropped[r],
           "dropped " << dropped.download<int32_t>(s)[0] << " != reference " << g.x.dropped[r]);
  if (c.mode == MOEKIT_EP_MODE_EXACT) {
    std::vector<int64_t> sent(ctx.num_ranks), received(ctx.num_ranks);
    EP_REQUIRE_OK(ctx, moekit_ep_layout_counts(e.handle, e.hl(), sent.data(), received.data()));
    for (int q = 0; q < ctx.num_ranks; ++q) {
      EP_CHECK(ctx, sent[q] == g.x.sent[r][q], "rows sent to " << q << ": " << sent[q] << " != "
                                                               << g.x.sent[r][q]);
      EP_CHECK(ctx, received[q] == g.x.sent[q][r],
               "rows received from " << q << ": " << received[q] << " != " << g.x.sent[q][r]);
    }
  }
  // Row buffers are sized by what the library says it receives (Rd), so that a wrong count fails
  // the comparisons below instead of writing past a buffer or leaving the other ranks waiting.
  const int64_t Rd = e.recv_rows, Rc = std::min(R, Rd);
  auto resized = [](std::vector<float> v, size_t n) {
    v.resize(n, NAN);
    return v;
  };
  Guarded partials(Rd * H * elem_size(g.combine_dtype), s), grad_recv_x(Rd * row_bytes, s),
      grad_recv_w(Rd * K * 4, s);
  partials.upload(to_dtype_bytes(g.combine_dtype, resized(g.partials[r], Rd * H)), s);
  grad_recv_x.upload(to_dtype_bytes(c.dtype, resized(g.grad_recv_x[r], Rd * H)), s);
  grad_recv_w.upload(resized(g.grad_recv_w[r], Rd * K), s);
  Guarded recv_x(Rd * row_bytes, s), recv_idx(Rd * K * 4, s), recv_w(Rd * K * 4, s),
      recv_src(Rd * 4, s), recv_mask(Rd, s), y(T * row_bytes, s), grad_x(T * row_bytes, s),
      grad_w(T * K * 4, s), grad_partials(Rd * row_bytes, s), dual_y(T * row_bytes, s);
  ctx.sync(__LINE__);  // end of the second allocation phase

  const bool duality = g.combine_dtype == c.dtype;
  PassOutputs pass[2];
  for (int run = 0; run < 2; ++run) {
    if (run > 0)
      for (Guarded* b : {&recv_x, &recv_idx, &recv_w, &recv_src, &recv_mask, &y, &grad_x, &grad_w,
                         &grad_partials, &dual_y})
        b->poison(s);
    EP_REQUIRE_OK(ctx, moekit_ep_dispatch(e.handle, T, e.layout.get(), e.hl(), x.get(),
                                          indices.as<int32_t>(), weights.as<float>(), recv_x.get(),
                                          recv_idx.as<int32_t>(), recv_w.as<float>(),
                                          recv_src.as<int32_t>(), recv_mask.as<uint8_t>(),
                                          e.workspace.get(), e.workspace_bytes, s));
    EP_REQUIRE_OK(ctx, moekit_ep_combine(e.handle, T, e.layout.get(), e.hl(), partials.get(),
                                         y.get(), e.workspace.get(), e.workspace_bytes, s));
    EP_REQUIRE_OK(ctx, moekit_ep_dispatch_backward(
                           e.handle, T, e.layout.get(), e.hl(), indices.as<int32_t>(),
                           grad_recv_x.get(), grad_recv_w.as<float>(), grad_x.get(),
                           grad_w.as<float>(), e.workspace.get(), e.workspace_bytes, s));
    EP_REQUIRE_OK(ctx, moekit_ep_combine_backward(e.handle, T, e.layout.get(), e.hl(),
                                                  grad_y.get(), grad_partials.get(),
                                                  e.workspace.get(), e.workspace_bytes, s));
    if (duality)  // dispatch backward is a combine: the same call on the same rows
      EP_REQUIRE_OK(ctx, moekit_ep_combine(e.handle, T, e.layout.get(), e.hl(), grad_recv_x.get(),
                                           dual_y.get(), e.workspace.get(), e.workspace_bytes, s));

    for (const Guarded* b : {&recv_x, &recv_idx, &recv_w, &recv_src, &recv_mask, &y, &grad_x,
                             &grad_w, &grad_partials})
      EP_CHECK(ctx, b->guards_intact(s), "a write outside an output (guard region changed)");

    PassOutputs& out = pass[run];
    out.recv_x = recv_x.download<uint8_t>(s);
    out.recv_idx = recv_idx.download<uint8_t>(s);
    out.recv_w = recv_w.download<uint8_t>(s);
    out.recv_src = recv_src.download<uint8_t>(s);
    out.recv_mask = recv_mask.download<uint8_t>(s);
    out.y = y.download<uint8_t>(s);
    out.grad_x = grad_x.download<uint8_t>(s);
    out.grad_w = grad_w.download<uint8_t>(s);
    out.grad_partials = grad_partials.download<uint8_t>(s);
    if (duality) EP_CHECK(ctx, dual_y.download<uint8_t>(s) == out.grad_x,
                          "dispatch backward differs from a combine of the same rows");
  }
  const std::string differing = pass[0].differing(pass[1]);
  EP_CHECK(ctx, differing.empty(), "two identical runs differ (not bitwise deterministic): " << differing);

  // Dispatch and combine backward against the reference rows.
  const PassOutputs& o = pass[0];
  const std::vector<int32_t> ridx = [&] {
    std::vector<int32_t> v(Rd * K);
    if (!v.empty()) std::memcpy(v.data(), o.recv_idx.data(), v.size() * 4);
    return v;
  }();
  int row_failures = 0;
  for (int64_t i = 0; i < Rc && row_failures < 4; ++i) {
    const moekit::ref::EpRecvRow want = g.x.rows[r][i];
    int32_t src_token;
    std::memcpy(&src_token, &o.recv_src[i * 4], 4);
    bool ok = true;
    if (want.src < 0) {  // a gap: +0 rows (dispatch and combine backward), no ids, no weights
      ok = src_token == -1 && o.recv_mask[i] == 0;
      for (int64_t b = 0; b < static_cast<int64_t>(row_bytes); ++b)
        ok = ok && o.recv_x[i * row_bytes + b] == 0 && o.grad_partials[i * row_bytes + b] == 0;
      for (int64_t k = 0; k < K; ++k) {
        float w;
        std::memcpy(&w, &o.recv_w[(i * K + k) * 4], 4);
        ok = ok && ridx[i * K + k] == -1 && w == 0.0f && !std::signbit(w);
      }
    } else {
      ok = src_token == want.token && o.recv_mask[i] == 1;
      const uint8_t* src_row = g.xrows[want.src].data() + want.token * row_bytes;
      const uint8_t* grad_row = g.grad_y[want.src].data() + want.token * row_bytes;
      ok = ok && std::memcmp(&o.recv_x[i * row_bytes], src_row, row_bytes) == 0;
      ok = ok && std::memcmp(&o.grad_partials[i * row_bytes], grad_row, row_bytes) == 0;
      ok = ok && std::memcmp(&ridx[i * K], &p.indices[want.src][want.token * K], K * 4) == 0;
      ok = ok && std::memcmp(&o.recv_w[i * K * 4], &g.routing.weights[want.src][want.token * K],
                             K * 4) == 0;
    }
    if (!ok) ++row_failures;
    EP_CHECK(ctx, ok, "received row " << i << " (want source " << want.src << " token "
                                      << want.token << ", got token " << src_token << ")");
  }

  // Combine and dispatch backward against the rank-ordered fp32 sums, bitwise.
  const std::vector<uint8_t> want_y =
      to_dtype_bytes(c.dtype, moekit::ref::ep_combine(p, g.x, r, H, g.partials));
  const std::vector<uint8_t> want_gx =
      to_dtype_bytes(c.dtype, moekit::ref::ep_combine(p, g.x, r, H, g.grad_recv_x));
  EP_CHECK(ctx, o.y == want_y, "combine differs from the rank-ordered fp32 sum");
  EP_CHECK(ctx, o.grad_x == want_gx, "dispatch backward differs from the rank-ordered fp32 sum");
  const std::vector<float> want_gw = moekit::ref::ep_grad_weights(p, g.x, r, g.grad_recv_w);
  EP_CHECK(ctx, std::memcmp(o.grad_w.data(), want_gw.data(), want_gw.size() * 4) == 0,
           "weight gradients differ from the owner ranks' rows");
}

// Checks on the host, before any rank thread starts, that the NCCL groups every rank of `g` will
// issue in check_rank match pair by pair (tests/ep/ep_script.hpp, from the library's own script
// and the reference's counts). Returns the mismatch in words, or "" (capacity mode: the same).
// `layouts_before`: layouts every rank runs before check_rank (same routing).
std::string script_mismatch(const Global& g, int layouts_before = 0) {
  const moekit::ep::Dims d = moekit::ep::dims_of(g.config);
  const int32_t signature = moekit::ep::config_signature(g.config);
  std::vector<std::vector<ScriptedCall>> calls;
  for (int r = 0; r < g.n; ++r) {
    std::vector<ScriptedCall> rank_calls(
        static_cast<size_t>(layouts_before),
        ScriptedCall{Call::kLayout, moekit::ep::call_payloads(Call::kLayout, false, false)});
    for (const ScriptedCall& call : check_rank_calls(g.routing.problem.num_tokens[r],
                                                     g.recv_rows[r], g.combine_dtype == g.c.dtype))
      rank_calls.push_back(call);
    calls.push_back(rank_calls);
  }
  return check_scripts(all_scripts(
      d, reference_host_layouts(d, signature, g.routing.problem, g.x), calls));
}

// Seconds one problem may take before the watchdog reports the ranks and ends the process: the
// problems here take well under a second, NCCL's first connections a few.
constexpr int kProblemTimeout = 60;

void run_case(const Case& c, uint64_t salt, bool with_one) {
  for (int n : ep_sizes(with_one)) {
    const Global g = make_global(c, n, salt);
    INFO("case " << c.name << ", ep = " << n);
    const std::string mismatch = script_mismatch(g);
    INFO("NCCL script check: " << (mismatch.empty() ? "every pair agrees" : mismatch));
    REQUIRE(mismatch.empty());  // running it would hang: fail here instead
    const std::vector<std::string> failures = run_ranks(
        n, [&](RankContext& ctx) { check_rank(ctx, g); }, kProblemTimeout,
        std::string("case ") + c.name + ", ep = " + std::to_string(n));
    for (const std::string& f : failures) UNSCOPED_INFO(f);
    CHECK(failures.empty());
  }
}

// ---- smoke: the smallest steps first --------------------------------------------------------

// ep = 2, exact mode, one chunk, a few tokens: the layout alone, then layout and dispatch. If the
// suite hangs, the first of these steps that the watchdog names is the smallest failing one.
void smoke_step(const char* label, const std::vector<int64_t>& tokens, bool with_dispatch,
                uint64_t salt) {
  const int n = 2;
  const Case c{label, 4, 2, 16, MOEKIT_DTYPE_BF16, -1, MOEKIT_EP_MODE_EXACT, 1, 0, tokens,
               0.25, 0.0, 0.0, 0.0};
  const Global g = make_global(c, n, salt);
  INFO("smoke: " << label);
  {
    const moekit::ep::Dims d = moekit::ep::dims_of(g.config);
    std::vector<ScriptedCall> rank_calls{
        {Call::kLayout, moekit::ep::call_payloads(Call::kLayout, false, false)}};
    if (with_dispatch)
      rank_calls.push_back({Call::kDispatch, moekit::ep::call_payloads(Call::kDispatch, false,
                                                                       false)});
    const std::string mismatch = check_scripts(all_scripts(
        d,
        reference_host_layouts(d, moekit::ep::config_signature(g.config), g.routing.problem,
                               g.x),
        std::vector<std::vector<ScriptedCall>>(n, rank_calls)));
    INFO("NCCL script check: " << (mismatch.empty() ? "every pair agrees" : mismatch));
    REQUIRE(mismatch.empty());
  }
  const std::vector<std::string> failures = run_ranks(n, [&](RankContext& ctx) {
    const int r = ctx.rank;
    cudaStream_t s = ctx.stream;
    const EpProblem& p = g.routing.problem;
    const int64_t T = p.num_tokens[r], H = c.hidden, K = c.top_k, R = g.recv_rows[r];
    const size_t row_bytes = H * 2;
    RankEp e;
    create_rank_ep(ctx, g.config, e);
    Guarded idx(T * K * 4, s), w(T * K * 4, s), x(T * row_bytes, s);
    idx.upload(p.indices[r], s);
    w.upload(g.routing.weights[r], s);
    x.upload(g.xrows[r], s);
    ctx.sync(__LINE__);  // end of the allocation phase
    run_layout(ctx, g.config, e, T, idx.as<int32_t>(), nullptr, nullptr);
    EP_CHECK(ctx, e.recv_rows == R, "num_recv_rows " << e.recv_rows << " != reference " << R);
    std::vector<int64_t> sent(n), received(n);
    EP_REQUIRE_OK(ctx, moekit_ep_layout_counts(e.handle, e.hl(), sent.data(), received.data()));
    for (int q = 0; q < n; ++q)
      EP_CHECK(ctx, sent[q] == g.x.sent[r][q] && received[q] == g.x.sent[q][r],
               "rows to/from rank " << q << ": " << sent[q] << "/" << received[q]
                                    << ", reference " << g.x.sent[r][q] << "/" << g.x.sent[q][r]);
    if (!with_dispatch) return;  // the same on every rank
    // Sized by the library's count (a wrong count fails the checks, never writes out of bounds).
    const int64_t Rd = e.recv_rows;
    Guarded recv_x(Rd * row_bytes, s), recv_idx(Rd * K * 4, s), recv_w(Rd * K * 4, s),
        recv_src(Rd * 4, s);
    ctx.sync(__LINE__);  // end of the allocation phase
    EP_REQUIRE_OK(ctx, moekit_ep_dispatch(e.handle, T, e.layout.get(), e.hl(), x.get(),
                                          idx.as<int32_t>(), w.as<float>(), recv_x.get(),
                                          recv_idx.as<int32_t>(), recv_w.as<float>(),
                                          recv_src.as<int32_t>(), nullptr, e.workspace.get(),
                                          e.workspace_bytes, s));
    const std::vector<uint8_t> got_x = recv_x.download<uint8_t>(s);
    const std::vector<int32_t> got_idx = recv_idx.download<int32_t>(s);
    const std::vector<float> got_w = recv_w.download<float>(s);
    const std::vector<int32_t> got_src = recv_src.download<int32_t>(s);
    for (int64_t i = 0; i < std::min(R, Rd); ++i) {
      const moekit::ref::EpRecvRow want = g.x.rows[r][i];
      const bool ok = got_src[i] == want.token &&
                std::memcmp(&got_x[i * row_bytes],
                            g.xrows[want.src].data() + want.token * row_bytes, row_bytes) == 0 &&
                std::memcmp(&got_idx[i * K], &p.indices[want.src][want.token * K], K * 4) == 0 &&
                std::memcmp(&got_w[i * K], &g.routing.weights[want.src][want.token * K],
                            K * 4) == 0;
      EP_CHECK(ctx, ok, "received row " << i << ": want rank " << want.src << " token "
                                        << want.token << ", got token " << got_src[i]);
    }
    for (const Guarded* b : {&recv_x, &recv_idx, &recv_w, &recv_src})
      EP_CHECK(ctx, b->guards_intact(s), "dispatch wrote outside an output");
  }, 30, std::string("smoke: ") + label);
  for (const std::string& f : failures) UNSCOPED_INFO(f);
  REQUIRE(failures.empty());
}

TEST_CASE("ep gpu smoke: ep = 2, exact mode, layout then dispatch of a few tokens",
          "[gpu][ep][smoke]") {
  smoke_step("layout only, T = 5 and 3", {5, 3}, false, 61);
  smoke_step("layout and dispatch, T = 5 and 3", {5, 3}, true, 62);
  smoke_step("layout and dispatch, T = 5 and 0 (a rank without tokens)", {5, 0}, true, 63);
  smoke_step("layout and dispatch, T = 0 and 0", {0, 0}, true, 64);
}

// ---- the exchange ----------------------------------------------------------------------------

TEST_CASE("ep gpu: exact mode moves exactly the reference's rows and sums", "[gpu][ep]") {
  run_case({"exact bf16 K4", 8, 4, 64, MOEKIT_DTYPE_BF16, -1, MOEKIT_EP_MODE_EXACT, 1, 0,
            {37, 0, 300, 5}, 0.3, 0.1, 0.05, 0.1},
           1, true);
  run_case({"exact f32 K8 3 chunks, several tiles", 32, 8, 40, MOEKIT_DTYPE_F32, -1,
            MOEKIT_EP_MODE_EXACT, 3, 0, {700, 1100, 257}, 0.2, 0.0, 0.01, 0.0},
           2, false);
  run_case({"exact bf16 H=9 (scalar paths)", 4, 2, 9, MOEKIT_DTYPE_BF16, -1,
            MOEKIT_EP_MODE_EXACT, 2, 0, {51, 3}, 0.1, 0.1, 0.0, 0.2},
           3, false);
  run_case({"exact bf16 E=256n K=32", 256, 32, 16, MOEKIT_DTYPE_BF16, -1, MOEKIT_EP_MODE_EXACT,
            2, 0, {200, 77}, 0.0, 0.05, 0.0, 0.0},
           4, false);
}

TEST_CASE("ep gpu: exact mode at a realistic size (T=2048, H=1024, K=8, 4 chunks)",
          "[gpu][ep][large]") {
  run_case({"exact bf16 K8 T=2048 H=1024 4 chunks", 32, 8, 1024, MOEKIT_DTYPE_BF16, -1,
            MOEKIT_EP_MODE_EXACT, 4, 0, {2048}, 0.0, 0.0, 0.0, 0.0},
           5, false);
  run_case({"capacity bf16 K8 T=2048 H=1024 4 chunks", 32, 8, 1024, MOEKIT_DTYPE_BF16, -1,
            MOEKIT_EP_MODE_CAPACITY, 4, 0, {2048}, 0.0, 0.0, 0.0, 0.0},
           10, false);
}

TEST_CASE("ep gpu: capacity mode, with and without overflow", "[gpu][ep]") {
  run_case({"capacity bf16->f32 partials, 4 chunks, no drops", 16, 6, 72, MOEKIT_DTYPE_BF16,
            MOEKIT_DTYPE_F32, MOEKIT_EP_MODE_CAPACITY, 4, 0, {600, 13, 0}, 0.2, 0.1, 0.02, 0.0},
           6, true);
  run_case({"capacity f16 overflow (capacity 5, 2 chunks)", 4, 3, 24, MOEKIT_DTYPE_F16, -1,
            MOEKIT_EP_MODE_CAPACITY, 2, 5, {60, 9, 33}, 0.1, 0.0, 0.0, 0.0},
           7, true);
  run_case({"capacity f32 overflow (capacity 1)", 2, 2, 8, MOEKIT_DTYPE_F32, -1,
            MOEKIT_EP_MODE_CAPACITY, 1, 1, {20}, 0.0, 0.0, 0.0, 0.0},
           8, false);
}

TEST_CASE("ep gpu: tokens whose experts are all local never leave their rank", "[gpu][ep]") {
  for (int n : ep_sizes(false)) {
    // Rank 0's tokens are all local-only; the others route at random.
    Case c{"local only", 8, 4, 32, MOEKIT_DTYPE_BF16, -1, MOEKIT_EP_MODE_EXACT, 2, 0, {90},
           0.0, 0.0, 0.0, 0.0};
    Global g = make_global(c, n, 9);
    auto rng = moekit::test::make_rng(99);
    for (int64_t t = 0; t < g.routing.problem.num_tokens[0]; ++t) {
      std::vector<int32_t> local(8);
      std::iota(local.begin(), local.end(), 0);
      std::shuffle(local.begin(), local.end(), rng);
      std::copy(local.begin(), local.begin() + 4, &g.routing.problem.indices[0][t * 4]);
    }
    g.x = moekit::ref::ep_exchange(g.routing.problem);
    for (int q = 1; q < n; ++q) REQUIRE(g.x.sent[0][q] == 0);
    for (int q = 0; q < n; ++q) {
      g.recv_rows[q] = static_cast<int64_t>(g.x.rows[q].size());
      auto rng2 = moekit::test::make_rng(100 + q);
      g.partials[q] = random_values(rng2, g.recv_rows[q] * 32, MOEKIT_DTYPE_BF16);
      g.grad_recv_x[q] = random_values(rng2, g.recv_rows[q] * 32, MOEKIT_DTYPE_BF16);
      g.grad_recv_w[q] = moekit::test::uniform(rng2, g.recv_rows[q] * 4, -1.0f, 1.0f);
    }
    INFO("ep = " << n);
    const std::string mismatch = script_mismatch(g, 1);
    INFO("NCCL script check: " << (mismatch.empty() ? "every pair agrees" : mismatch));
    REQUIRE(mismatch.empty());
    const std::vector<std::string> failures = run_ranks(n, [&](RankContext& ctx) {
      // Rank 0 reports 0 rows for every other rank, and every other rank 0 rows from rank 0.
      RankEp e;
      create_rank_ep(ctx, g.config, e);
      const EpProblem& p = g.routing.problem;
      Guarded idx(p.num_tokens[ctx.rank] * 16, ctx.stream);
      idx.upload(p.indices[ctx.rank], ctx.stream);
      ctx.sync(__LINE__);  // end of the allocation phase
      run_layout(ctx, g.config, e, p.num_tokens[ctx.rank], idx.as<int32_t>(), nullptr, nullptr);
      std::vector<int64_t> sent(n), received(n);
      EP_REQUIRE_OK(ctx, moekit_ep_layout_counts(e.handle, e.hl(), sent.data(), received.data()));
      for (int q = 0; q < n; ++q) {
        if (ctx.rank == 0 && q != 0) EP_CHECK(ctx, sent[q] == 0, "rank 0 sends " << sent[q]);
        if (ctx.rank != 0 && q == 0)
          EP_CHECK(ctx, received[q] == 0, "received " << received[q] << " rows from rank 0");
      }
      check_rank(ctx, g);  // and the full exchange is still exact (its allocations end in a sync)
    }, kProblemTimeout, "local only, ep = " + std::to_string(n));
    for (const std::string& f : failures) UNSCOPED_INFO(f);
    CHECK(failures.empty());
  }
}

// ---- graphs ----------------------------------------------------------------------------------

TEST_CASE("ep gpu: capacity mode replays from a CUDA graph with new routing; exact mode refuses",
          "[gpu][ep]") {
  for (int n : ep_sizes(false)) {
    Case c{"graph", 8, 4, 48, MOEKIT_DTYPE_BF16, -1, MOEKIT_EP_MODE_CAPACITY, 2, 0, {120},
           0.1, 0.0, 0.0, 0.0};
    // Two routings of the same shape: the graph is captured once and replayed on both.
    const Global g1 = make_global(c, n, 11), g2 = make_global(c, n, 12);
    INFO("ep = " << n);
    const std::vector<std::string> failures = run_ranks(n, [&](RankContext& ctx) {
      const int r = ctx.rank;
      cudaStream_t s = ctx.stream;
      const int64_t T = g1.routing.problem.num_tokens[r], H = c.hidden, K = c.top_k;
      const int64_t R = g1.recv_rows[r];
      const size_t row_bytes = H * 2;
      RankEp e;
      create_rank_ep(ctx, g1.config, e);
      EP_REQUIRE_OK(ctx, moekit_ep_workspace_size(&g1.config, nullptr, &e.workspace_bytes));
      e.workspace = DeviceBuffer(e.workspace_bytes);
      Guarded idx(T * K * 4, s), w(T * K * 4, s), x(T * row_bytes, s), dropped(4, s),
          recv_x(R * row_bytes, s), recv_idx(R * K * 4, s), recv_w(R * K * 4, s),
          recv_src(R * 4, s), partials(R * row_bytes, s), y(T * row_bytes, s);
      int64_t rows = -1;

      // Exact mode on a capturing stream: refused before anything is enqueued.
      {
        moekit_ep_config_t exact = g1.config;
        exact.mode = MOEKIT_EP_MODE_EXACT;
        RankEp ee;
        create_rank_ep(ctx, exact, ee);
        idx.upload(g1.routing.problem.indices[r], s);
        EP_CUDA_OK(ctx, cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        const moekit_status_t st =
            EP_CALL(moekit_ep_layout(ee.handle, T, idx.as<int32_t>(), nullptr, ee.layout.get(),
                                     ee.layout_bytes, ee.hl(), &rows, nullptr, s));
        cudaGraph_t empty = nullptr;
        EP_CUDA_OK(ctx, cudaStreamEndCapture(s, &empty));
        EP_CHECK(ctx, st == MOEKIT_STATUS_INVALID_ARGUMENT &&
                          std::strstr(moekit_get_last_error(), "captured") != nullptr,
                 "exact layout under capture: " << moekit_status_string(st) << ": "
                                                << moekit_get_last_error());
        size_t nodes = 99;
        EP_CUDA_OK(ctx, cudaGraphGetNodes(empty, nullptr, &nodes));
        EP_CHECK(ctx, nodes == 0, "the refused call enqueued " << nodes << " nodes");
        cudaGraphDestroy(empty);
      }

      ctx.sync(__LINE__);  // end of the allocation phase (ee was created and destroyed above)

      // An eager pass first (NCCL sets up its peer connections outside the capture), checked
      // below against the graph's replay of the same inputs.
      idx.upload(g1.routing.problem.indices[r], s);
      w.upload(g1.routing.weights[r], s);
      x.upload(g1.xrows[r], s);
      partials.upload(to_dtype_bytes(MOEKIT_DTYPE_BF16, g1.partials[r]), s);
      EP_REQUIRE_OK(ctx, moekit_ep_layout(e.handle, T, idx.as<int32_t>(), nullptr, e.layout.get(),
                                          e.layout_bytes, nullptr, &rows, dropped.as<int32_t>(),
                                          s));
      EP_REQUIRE_OK(ctx, moekit_ep_dispatch(e.handle, T, e.layout.get(), nullptr, x.get(),
                                            idx.as<int32_t>(), w.as<float>(), recv_x.get(),
                                            recv_idx.as<int32_t>(), recv_w.as<float>(),
                                            recv_src.as<int32_t>(), nullptr, e.workspace.get(),
                                            e.workspace_bytes, s));
      EP_REQUIRE_OK(ctx, moekit_ep_combine(e.handle, T, e.layout.get(), nullptr, partials.get(),
                                           y.get(), e.workspace.get(), e.workspace_bytes, s));
      const std::vector<uint8_t> eager_x = recv_x.download<uint8_t>(s);
      const std::vector<uint8_t> eager_y = y.download<uint8_t>(s);

      ctx.sync(__LINE__);  // every rank captures at the same time
      EP_CUDA_OK(ctx, cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      EP_REQUIRE_OK(ctx, moekit_ep_layout(e.handle, T, idx.as<int32_t>(), nullptr, e.layout.get(),
                                          e.layout_bytes, nullptr, &rows, dropped.as<int32_t>(),
                                          s));
      EP_REQUIRE_OK(ctx, moekit_ep_dispatch(e.handle, T, e.layout.get(), nullptr, x.get(),
                                            idx.as<int32_t>(), w.as<float>(), recv_x.get(),
                                            recv_idx.as<int32_t>(), recv_w.as<float>(),
                                            recv_src.as<int32_t>(), nullptr, e.workspace.get(),
                                            e.workspace_bytes, s));
      EP_REQUIRE_OK(ctx, moekit_ep_combine(e.handle, T, e.layout.get(), nullptr, partials.get(),
                                           y.get(), e.workspace.get(), e.workspace_bytes, s));
      cudaGraph_t graph = nullptr;
      EP_CUDA_OK(ctx, cudaStreamEndCapture(s, &graph));
      cudaGraphExec_t exec = nullptr;
      EP_CUDA_OK(ctx, cudaGraphInstantiate(&exec, graph, 0));
      EP_CHECK(ctx, rows == R, "num_recv_rows " << rows << " != " << R);

      for (const Global* g : {&g1, &g2}) {
        // New inputs in the same buffers, outputs poisoned, then a replay.
        idx.upload(g->routing.problem.indices[r], s);
        w.upload(g->routing.weights[r], s);
        x.upload(g->xrows[r], s);
        partials.upload(to_dtype_bytes(MOEKIT_DTYPE_BF16, g->partials[r]), s);
        for (Guarded* b : {&recv_x, &recv_idx, &recv_src, &y, &dropped}) b->poison(s);
        ctx.sync(__LINE__);  // also ends the allocation phase of cudaGraphInstantiate
        EP_CUDA_OK(ctx, cudaGraphLaunch(exec, s));
        EP_CUDA_OK(ctx, cudaStreamSynchronize(s));
        EP_CHECK(ctx, dropped.download<int32_t>(s)[0] == g->x.dropped[r], "dropped count");
        const std::vector<uint8_t> got_x = recv_x.download<uint8_t>(s);
        const std::vector<int32_t> got_src = recv_src.download<int32_t>(s);
        int bad = 0;
        for (int64_t i = 0; i < R; ++i) {
          const moekit::ref::EpRecvRow want = g->x.rows[r][i];
          bool ok = got_src[i] == (want.src < 0 ? -1 : want.token);
          if (want.src >= 0)
            ok = ok && std::memcmp(&got_x[i * row_bytes],
                                   g->xrows[want.src].data() + want.token * row_bytes,
                                   row_bytes) == 0;
          bad += ok ? 0 : 1;
        }
        EP_CHECK(ctx, bad == 0, bad << " received rows differ after a graph replay");
        EP_CHECK(ctx, y.download<uint8_t>(s) ==
                          to_dtype_bytes(MOEKIT_DTYPE_BF16,
                                         moekit::ref::ep_combine(g->routing.problem, g->x, r, H,
                                                                 g->partials)),
                 "combine differs after a graph replay");
        for (const Guarded* b : {&recv_x, &recv_idx, &recv_w, &recv_src, &y})
          EP_CHECK(ctx, b->guards_intact(s), "a graph replay wrote outside an output");
        if (g == &g1) {
          EP_CHECK(ctx, y.download<uint8_t>(s) == eager_y, "graph and eager combine differ");
          // Gap rows of recv_x are unspecified; compare the real ones.
          const std::vector<uint8_t> replay_x = recv_x.download<uint8_t>(s);
          bool same = true;
          for (int64_t i = 0; i < R; ++i)
            if (g1.x.rows[r][i].src >= 0)
              same = same && std::memcmp(&replay_x[i * row_bytes], &eager_x[i * row_bytes],
                                         row_bytes) == 0;
          EP_CHECK(ctx, same, "graph and eager dispatch differ");
        }
      }
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    }, kProblemTimeout, "graph replay, ep = " + std::to_string(n));
    for (const std::string& f : failures) UNSCOPED_INFO(f);
    CHECK(failures.empty());
  }
}

// ---- end to end: expert-parallel routed compute == one GPU -------------------------------------

struct PlanOnDevice {
  moekit_plan_config_t config{};
  moekit_token_plan_t plan{};
  DeviceBuffer buffer, workspace;
  int64_t max_rows = 0;
};

void build_plan(PlanOnDevice& pd, int E, int K, int e0, int e_local, int64_t T,
                const int32_t* indices, const uint8_t* mask, cudaStream_t s) {
  if (moekit_plan_config_init(&pd.config, sizeof(pd.config)) != MOEKIT_STATUS_SUCCESS ||
      moekit_token_plan_init(&pd.plan, sizeof(pd.plan)) != MOEKIT_STATUS_SUCCESS)
    throw std::runtime_error("plan init failed");
  pd.config.num_experts = E;
  pd.config.top_k = K;
  pd.config.local_expert_begin = e0;
  pd.config.num_local_experts = e_local;
  size_t buffer_bytes = 0, ws_bytes = 0;
  auto ok = [](moekit_status_t st) {
    if (st != MOEKIT_STATUS_SUCCESS) throw std::runtime_error(moekit_get_last_error());
  };
  ok(moekit_plan_max_rows(&pd.config, T, &pd.max_rows));
  ok(moekit_plan_buffer_size(&pd.config, T, &buffer_bytes));
  ok(moekit_plan_workspace_size(&pd.config, T, &ws_bytes));
  pd.buffer = DeviceBuffer(buffer_bytes);
  pd.workspace = DeviceBuffer(ws_bytes);
  ok(moekit_plan_bind(&pd.config, T, pd.buffer.get(), buffer_bytes, &pd.plan));
  ok(moekit_plan_build(&pd.config, T, indices, nullptr, mask, &pd.plan, pd.workspace.get(),
                       ws_bytes, s));
}

// y = combine(scale(permute(x))) and its backward for a plan: the routed computation of one GPU
// (the whole batch) or of one EP rank (its received rows).
struct Routed {
  DeviceBuffer xp, yp, y, grad_yp, grad_xp, grad_x, grad_w;
};

void routed_forward_backward(PlanOnDevice& pd, moekit_dtype_t dtype, int64_t T, int64_t H,
                             const int32_t* indices, const void* x, const float* weights,
                             const void* grad_y, Routed& out, cudaStream_t s) {
  auto ok = [](moekit_status_t st) {
    if (st != MOEKIT_STATUS_SUCCESS) throw std::runtime_error(moekit_get_last_error());
  };
  const size_t e = elem_size(dtype);
  const int64_t rows = std::max<int64_t>(pd.max_rows, 1);
  const int K = pd.config.top_k;
  out.xp = DeviceBuffer(rows * H * e);
  out.yp = DeviceBuffer(rows * H * e);
  out.grad_yp = DeviceBuffer(rows * H * e);
  out.grad_xp = DeviceBuffer(rows * H * e);
  out.y = DeviceBuffer(std::max<int64_t>(T, 1) * H * e);
  out.grad_x = DeviceBuffer(std::max<int64_t>(T, 1) * H * e);
  out.grad_w = DeviceBuffer(std::max<int64_t>(T, 1) * K * 4);
  ok(moekit_tokens_permute(&pd.config, &pd.plan, T, H, dtype, x, H, nullptr, out.xp.get(),
                           nullptr, s));
  if (scale_rows_by_expert(dtype, pd.max_rows, H, pd.plan.slot_of_row, pd.plan.totals, indices,
                           out.xp.get(), out.yp.get(), s) != cudaSuccess)
    throw std::runtime_error("scale kernel failed");
  ok(moekit_tokens_combine(&pd.config, &pd.plan, T, H, dtype, out.yp.get(), weights, out.y.get(),
                           H, s));
  ok(moekit_tokens_combine_backward(&pd.config, &pd.plan, T, H, dtype, grad_y, H, weights,
                                    out.yp.get(), out.grad_yp.get(), out.grad_w.get<float>(), s));
  if (scale_rows_by_expert(dtype, pd.max_rows, H, pd.plan.slot_of_row, pd.plan.totals, indices,
                           out.grad_yp.get(), out.grad_xp.get(), s) != cudaSuccess)
    throw std::runtime_error("scale kernel failed");
  ok(moekit_tokens_permute_backward(&pd.config, &pd.plan, T, H, dtype, out.grad_xp.get(), nullptr,
                                    out.grad_x.get(), H, nullptr, s));
}

TEST_CASE("ep gpu: an expert-parallel routed computation equals the one-GPU computation",
          "[gpu][ep]") {
  for (moekit_dtype_t dtype : {MOEKIT_DTYPE_F32, MOEKIT_DTYPE_BF16}) {
    for (moekit_ep_mode_t mode : {MOEKIT_EP_MODE_EXACT, MOEKIT_EP_MODE_CAPACITY}) {
      for (int n : ep_sizes(false)) {
        const int per_rank = 4, E = per_rank * n, K = 3;
        const int64_t H = 64;
        Case c{"e2e", per_rank, K, H, dtype, -1, mode, 2, 0, {150, 61}, 0.1, 0.05, 0.0, 0.0};
        const Global g = make_global(c, n, 20 + static_cast<int>(dtype) * 2 + mode);
        const EpProblem& p = g.routing.problem;
        INFO("dtype " << dtype << ", mode " << mode << ", ep = " << n);
        // Inputs as values: small integers in f32 (every sum exact, so EP must match bitwise),
        // random values in bf16 (rounding differs by association: tolerance).
        auto rng = moekit::test::make_rng(31 + n);
        std::vector<int64_t> offset(n + 1, 0);
        for (int r = 0; r < n; ++r) offset[r + 1] = offset[r] + p.num_tokens[r];
        const int64_t T_all = offset[n];
        std::vector<float> x_all(T_all * H), dy_all(T_all * H), w_all(T_all * K);
        std::vector<int32_t> idx_all(T_all * K);
        std::vector<uint8_t> mask_all(T_all, 1);
        std::uniform_int_distribution<int> small(-3, 3);
        for (auto& v : x_all) v = dtype == MOEKIT_DTYPE_F32 ? small(rng) : small(rng) * 0.37f + 0.01f;
        for (auto& v : dy_all) v = dtype == MOEKIT_DTYPE_F32 ? small(rng) : small(rng) * 0.21f;
        for (auto& v : w_all) v = dtype == MOEKIT_DTYPE_F32 ? 0.25f * (1 + small(rng) + 3) : 0.1f + 0.05f * (small(rng) + 3);
        x_all = moekit::test::rounded(dtype, x_all);
        dy_all = moekit::test::rounded(dtype, dy_all);
        for (int r = 0; r < n; ++r) {
          std::copy(p.indices[r].begin(), p.indices[r].end(), idx_all.begin() + offset[r] * K);
          if (!p.masks[r].empty())
            std::copy(p.masks[r].begin(), p.masks[r].end(), mask_all.begin() + offset[r]);
        }

        // One GPU (device 0), the whole batch.
        std::vector<uint8_t> y_one, gx_one, gw_one;
        {
          CUDA_REQUIRE(cudaSetDevice(0));
          cudaStream_t s;
          CUDA_REQUIRE(cudaStreamCreate(&s));
          DeviceBuffer idx = DeviceBuffer::from(idx_all), mask = DeviceBuffer::from(mask_all),
                       w = DeviceBuffer::from(w_all), x = DeviceBuffer::from(moekit::test::pack(dtype, x_all)),
                       dy = DeviceBuffer::from(moekit::test::pack(dtype, dy_all));
          PlanOnDevice pd;
          build_plan(pd, E, K, 0, E, T_all, idx.get<int32_t>(), mask.get<uint8_t>(), s);
          Routed out;
          routed_forward_backward(pd, dtype, T_all, H, idx.get<int32_t>(), x.get(), w.get<float>(),
                                  dy.get(), out, s);
          CUDA_REQUIRE(cudaStreamSynchronize(s));
          y_one = out.y.to_host<uint8_t>();
          gx_one = out.grad_x.to_host<uint8_t>();
          gw_one = out.grad_w.to_host<uint8_t>();
          CUDA_REQUIRE(cudaStreamDestroy(s));
        }

        // Expert parallel: every rank its slice.
        std::vector<std::vector<uint8_t>> y_ep(n), gx_ep(n), gw_ep(n);
        const std::vector<std::string> failures = run_ranks(n, [&](RankContext& ctx) {
          const int r = ctx.rank;
          cudaStream_t s = ctx.stream;
          const int64_t T = p.num_tokens[r];
          const size_t e = elem_size(dtype);
          auto slice = [&](const auto& all, int64_t width) {
            using V = typename std::decay_t<decltype(all)>::value_type;
            return std::vector<V>(all.begin() + offset[r] * width,
                                  all.begin() + offset[r + 1] * width);
          };
          Guarded idx(T * K * 4, s), w(T * K * 4, s), x(T * H * e, s), dy(T * H * e, s),
              mask(T, s), y(T * H * e, s), gx(T * H * e, s), gw(T * K * 4, s);
          idx.upload(slice(idx_all, K), s);
          w.upload(slice(w_all, K), s);
          x.upload(moekit::test::pack(dtype, slice(x_all, H)), s);
          dy.upload(moekit::test::pack(dtype, slice(dy_all, H)), s);
          mask.upload(slice(mask_all, 1), s);
          RankEp ep;
          create_rank_ep(ctx, g.config, ep);
          ctx.sync(__LINE__);  // end of the first allocation phase
          run_layout(ctx, g.config, ep, T, idx.as<int32_t>(), mask.as<uint8_t>(), nullptr);
          const int64_t R = ep.recv_rows;
          Guarded rx(R * H * e, s), ridx(R * K * 4, s), rw(R * K * 4, s), rmask(R, s),
              partials(R * H * e, s), grad_partials(R * H * e, s);
          ctx.sync(__LINE__);  // end of the second
          EP_REQUIRE_OK(ctx, moekit_ep_dispatch(ep.handle, T, ep.layout.get(), ep.hl(), x.get(),
                                                idx.as<int32_t>(), w.as<float>(), rx.get(),
                                                ridx.as<int32_t>(), rw.as<float>(), nullptr,
                                                rmask.as<uint8_t>(), ep.workspace.get(),
                                                ep.workspace_bytes, s));
          // The receiver's local plan over its rows (gaps masked), the expert, the local combine.
          PlanOnDevice pd;
          crumb_step("build_plan (cudaMalloc, moekit_plan_build)", __LINE__);
          build_plan(pd, E, K, r * per_rank, per_rank, R, ridx.as<int32_t>(), rmask.as<uint8_t>(),
                     s);
          Routed local;
          ctx.sync(__LINE__);  // end of build_plan's allocations
          EP_REQUIRE_OK(ctx, moekit_ep_combine_backward(ep.handle, T, ep.layout.get(), ep.hl(),
                                                        dy.get(), grad_partials.get(),
                                                        ep.workspace.get(), ep.workspace_bytes, s));
          crumb_step("routed_forward_backward (cudaMalloc, tokens calls)", __LINE__);
          routed_forward_backward(pd, dtype, R, H, ridx.as<int32_t>(), rx.get(), rw.as<float>(),
                                  grad_partials.get(), local, s);
          ctx.sync(__LINE__);  // end of its allocations
          EP_CUDA_OK(ctx, cudaMemcpyAsync(partials.get(), local.y.get(), R * H * e,
                                          cudaMemcpyDeviceToDevice, s));
          EP_REQUIRE_OK(ctx, moekit_ep_combine(ep.handle, T, ep.layout.get(), ep.hl(),
                                               partials.get(), y.get(), ep.workspace.get(),
                                               ep.workspace_bytes, s));
          // local.grad_w is [R, K]: the weight gradient of each received row's slots.
          EP_REQUIRE_OK(ctx, moekit_ep_dispatch_backward(
                                 ep.handle, T, ep.layout.get(), ep.hl(), idx.as<int32_t>(),
                                 local.grad_x.get(), local.grad_w.get<float>(), gx.get(),
                                 gw.as<float>(), ep.workspace.get(), ep.workspace_bytes, s));
          y_ep[r] = y.download<uint8_t>(s);
          gx_ep[r] = gx.download<uint8_t>(s);
          gw_ep[r] = gw.download<uint8_t>(s);
        }, kProblemTimeout, "end to end, ep = " + std::to_string(n));
        for (const std::string& f : failures) UNSCOPED_INFO(f);
        REQUIRE(failures.empty());

        // Compare slices: bitwise in f32 (integer arithmetic), within bf16 tolerance otherwise.
        const size_t e = elem_size(dtype);
        for (int r = 0; r < n; ++r) {
          const std::vector<uint8_t> y_slice(y_one.begin() + offset[r] * H * e,
                                             y_one.begin() + offset[r + 1] * H * e);
          const std::vector<uint8_t> gx_slice(gx_one.begin() + offset[r] * H * e,
                                              gx_one.begin() + offset[r + 1] * H * e);
          const std::vector<uint8_t> gw_slice(gw_one.begin() + offset[r] * K * 4,
                                              gw_one.begin() + offset[r + 1] * K * 4);
          INFO("rank " << r);
          if (dtype == MOEKIT_DTYPE_F32) {
            CHECK(y_ep[r] == y_slice);
            CHECK(gx_ep[r] == gx_slice);
            CHECK(gw_ep[r] == gw_slice);
          } else {
            // bf16: the one-GPU sum rounds once, the EP sum rounds each rank's partial and then
            // the total: bound the difference by the magnitude of the terms, not of the result.
            const std::vector<float> a = moekit::test::unpack(dtype, y_ep[r]),
                                     b = moekit::test::unpack(dtype, y_slice),
                                     ga = moekit::test::unpack(dtype, gx_ep[r]),
                                     gb = moekit::test::unpack(dtype, gx_slice);
            std::vector<float> wa(gw_ep[r].size() / 4), wb(gw_slice.size() / 4);
            if (!wa.empty()) std::memcpy(wa.data(), gw_ep[r].data(), gw_ep[r].size());
            if (!wb.empty()) std::memcpy(wb.data(), gw_slice.data(), gw_slice.size());
            int bad = 0;
            for (int64_t t = 0; t < p.num_tokens[r]; ++t) {
              const int64_t tg = offset[r] + t;
              const bool real = mask_all[tg] != 0;
              for (int64_t h = 0; h < H; ++h) {
                double y_scale = 0, gx_scale = 0;
                for (int k = 0; k < K && real; ++k) {
                  const int32_t id = idx_all[tg * K + k];
                  if (id < 0 || id >= E) continue;
                  y_scale += std::fabs(w_all[tg * K + k]) * (id + 1) * std::fabs(x_all[tg * H + h]);
                  gx_scale += std::fabs(w_all[tg * K + k]) * (id + 1) * std::fabs(dy_all[tg * H + h]);
                }
                bad += std::fabs(a[t * H + h] - b[t * H + h]) <= 0.02 * y_scale + 1e-3 ? 0 : 1;
                bad += std::fabs(ga[t * H + h] - gb[t * H + h]) <= 0.02 * gx_scale + 1e-3 ? 0 : 1;
              }
              for (int k = 0; k < K; ++k) {
                const int32_t id = idx_all[tg * K + k];
                double dot_scale = 0;
                for (int64_t h = 0; h < H && real && id >= 0 && id < E; ++h)
                  dot_scale += std::fabs(dy_all[tg * H + h]) * (id + 1) * std::fabs(x_all[tg * H + h]);
                bad += std::fabs(wa[t * K + k] - wb[t * K + k]) <= 1e-5 * dot_scale + 1e-6 ? 0 : 1;
              }
            }
            CHECK(bad == 0);
          }
        }
      }
    }
  }
}

// ---- reductions ------------------------------------------------------------------------------

TEST_CASE("ep gpu: expert load and aux statistics summed over the communicator", "[gpu][ep]") {
  for (int n : ep_sizes(false)) {
    const int E = 300;
    auto rng = moekit::test::make_rng(41 + n);
    std::vector<std::vector<int32_t>> load(n);
    std::vector<std::vector<float>> sums(n);
    std::vector<int32_t> counts(n);
    std::vector<int32_t> want_load(E, 0);
    std::vector<float> want_sums(E, 0.0f);
    int32_t want_count = 0;
    for (int r = 0; r < n; ++r) {
      for (int i = 0; i < E; ++i) load[r].push_back(static_cast<int32_t>(rng() % 100000));
      sums[r] = moekit::test::uniform(rng, E, 0.0f, 50.0f);
      counts[r] = static_cast<int32_t>(rng() % 5000);
      for (int i = 0; i < E; ++i) {
        want_load[i] += load[r][i];
        want_sums[i] += sums[r][i];  // rank order, fp32, from +0
      }
      want_count += counts[r];
    }
    INFO("ep = " << n);
    const std::vector<std::string> failures = run_ranks(n, [&](RankContext& ctx) {
      cudaStream_t s = ctx.stream;
      Guarded l(E * 4, s), sm(E * 4, s), c(4, s);
      l.upload(load[ctx.rank], s);
      sm.upload(sums[ctx.rank], s);
      c.upload(std::vector<int32_t>{counts[ctx.rank]}, s);
      size_t ws_bytes = 0;
      EP_REQUIRE_OK(ctx, moekit_ep_aux_stats_workspace_size(ctx.comm, E, &ws_bytes));
      EP_CHECK(ctx, ws_bytes >= static_cast<size_t>(n) * E * 4, "aux workspace " << ws_bytes);
      DeviceBuffer ws(ws_bytes);
      ctx.sync(__LINE__);  // end of the allocation phase
      EP_REQUIRE_OK(ctx, moekit_ep_allreduce_expert_load(ctx.comm, E, l.as<int32_t>(), s));
      EP_REQUIRE_OK(ctx, moekit_ep_allreduce_aux_stats(ctx.comm, E, sm.as<float>(),
                                                       c.as<int32_t>(), ws.get(), ws_bytes, s));
      EP_CHECK(ctx, l.download<int32_t>(s) == want_load, "expert load sum");
      const std::vector<float> got = sm.download<float>(s);
      EP_CHECK(ctx, std::memcmp(got.data(), want_sums.data(), E * 4) == 0,
               "aux score sums are not the rank-ordered fp32 sums");
      EP_CHECK(ctx, c.download<int32_t>(s)[0] == want_count, "token count sum");
    }, kProblemTimeout, "reductions, ep = " + std::to_string(n));
    for (const std::string& f : failures) UNSCOPED_INFO(f);
    CHECK(failures.empty());
  }
}

// ---- bad input -------------------------------------------------------------------------------

TEST_CASE("ep gpu: bad arguments write nothing; ranks with different configurations are detected",
          "[gpu][ep]") {
  const int n = 2;
  Case c{"bad", 4, 2, 16, MOEKIT_DTYPE_BF16, -1, MOEKIT_EP_MODE_EXACT, 2, 0, {40}, 0.0, 0.0, 0.0,
         0.0};
  const Global g = make_global(c, n, 51);
  const std::vector<std::string> failures = run_ranks(n, [&](RankContext& ctx) {
    const int r = ctx.rank;
    cudaStream_t s = ctx.stream;
    const EpProblem& p = g.routing.problem;
    const int64_t T = p.num_tokens[r], H = c.hidden, K = c.top_k, R = g.recv_rows[r];
    RankEp e;
    create_rank_ep(ctx, g.config, e);
    Guarded idx(T * K * 4, s), w(T * K * 4, s), x(T * H * 2, s);
    idx.upload(p.indices[r], s);
    w.upload(g.routing.weights[r], s);
    x.upload(g.xrows[r], s);
    ctx.sync(__LINE__);  // end of the allocation phase
    run_layout(ctx, g.config, e, T, idx.as<int32_t>(), nullptr, nullptr);
    Guarded recv_x(R * H * 2, s), recv_idx(R * K * 4, s), recv_w(R * K * 4, s), y(T * H * 2, s);
    // Every rank makes the same mistake, so no rank reaches NCCL.
    const moekit_status_t small_ws = EP_CALL(moekit_ep_dispatch(
        e.handle, T, e.layout.get(), e.hl(), x.get(), idx.as<int32_t>(), w.as<float>(),
        recv_x.get(), recv_idx.as<int32_t>(), recv_w.as<float>(), nullptr, nullptr,
        e.workspace.get(), e.workspace_bytes - 1, s));
    EP_CHECK(ctx, small_ws == MOEKIT_STATUS_WORKSPACE_TOO_SMALL, moekit_get_last_error());
    const moekit_status_t wrong_t = EP_CALL(moekit_ep_combine(
        e.handle, T + 1, e.layout.get(), e.hl(), recv_x.get(), y.get(), e.workspace.get(),
        e.workspace_bytes, s));
    EP_CHECK(ctx, wrong_t == MOEKIT_STATUS_INVALID_ARGUMENT &&
                      std::strstr(moekit_get_last_error(), "num_tokens") != nullptr,
             moekit_get_last_error());
    EP_CUDA_OK(ctx, cudaSetDevice(1 - r));
    const moekit_status_t wrong_device = EP_CALL(moekit_ep_combine(
        e.handle, T, e.layout.get(), e.hl(), recv_x.get(), y.get(), e.workspace.get(),
        e.workspace_bytes, s));
    EP_CUDA_OK(ctx, cudaSetDevice(r));
    EP_CHECK(ctx, wrong_device == MOEKIT_STATUS_INVALID_ARGUMENT &&
                      std::strstr(moekit_get_last_error(), "current device") != nullptr,
             moekit_get_last_error());
    for (const Guarded* b : {&recv_x, &recv_idx, &recv_w, &y})
      EP_CHECK(ctx, b->untouched(s), "a refused call wrote an output");

    // Rank 1 created with another hidden size, then with another chunk count (the exchange has the
    // same size either way): every rank's layout fails and names the configuration; none hangs.
    for (int variant = 0; variant < 2; ++variant) {
      moekit_ep_config_t other = g.config;
      if (r == 1 && variant == 0) other.hidden = 24;
      if (r == 1 && variant == 1) other.num_chunks = 3;
      // Allocation phase: the previous variant's handle was destroyed after its layout returned
      // (every rank had issued that exchange), and this one is created; both end here.
      RankEp mismatched;
      create_rank_ep(ctx, other, mismatched);
      ctx.sync(__LINE__);
      int64_t rows = 0;
      const moekit_status_t st = EP_CALL(
          moekit_ep_layout(mismatched.handle, T, idx.as<int32_t>(), nullptr,
                           mismatched.layout.get(), mismatched.layout_bytes, mismatched.hl(),
                           &rows, nullptr, s));
      EP_CHECK(ctx, st == MOEKIT_STATUS_INVALID_ARGUMENT &&
                        std::strstr(moekit_get_last_error(), "different configuration") != nullptr,
               "variant " << variant << ": " << moekit_status_string(st) << ": "
                          << moekit_get_last_error());
    }
  }, kProblemTimeout, "bad arguments, ep = 2");
  for (const std::string& f : failures) UNSCOPED_INFO(f);
  CHECK(failures.empty());
}

}  // namespace

#endif  // MOEKIT_EP_TEST_HAVE_NCCL
