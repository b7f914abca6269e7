// The expert-parallel MoE layer (moekit_layer with config->expert_parallel) on 2 and 4 GPUs against
// the same layer on one GPU over the global batch (every rank's tokens, in rank order):
//  - routing is the same (the router inputs are chosen so that every logit is exact in fp32, so
//    no summation order can move a top-k choice): each rank's indices equal its slice, bitwise,
//    and the ranks' expert loads add up to the one-GPU load exactly;
//  - y and dx of each rank equal its slice of the one-GPU results, and each rank's expert weight
//    gradients equal the one-GPU gradients of its experts, within a tolerance per dtype (the EP
//    combine rounds each rank's partial sum before the cross-rank sum; weight-gradient row chunks
//    differ with the row count); router and shared-MLP gradients summed over the ranks equal the
//    one-GPU ones (they are data-parallel contributions);
//  - a second forward + backward gives bitwise the same outputs on every rank, and in capacity
//    mode so does a CUDA graph of the whole forward + backward (NCCL calls included);
//  - with ep_global_statistics and an aux-loss coefficient: every rank's load is the global one
//    and the aux term of each token's router gradient is the global batch's (router gradients
//    summed over ranks equal one GPU's with the same coefficient);
//  - both EP modes (exact, capacity without drops, dropped pairs counted as 0), a rank with no
//    tokens, padding tokens, and ranks that receive no row at all (a correction bias keeps every
//    token on rank 0's experts).
#if MOEKIT_EP_TEST_HAVE_NCCL

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "moekit/moekit.h"
#include "tests/ep/multi_gpu.hpp"
#include "tests/support/catch.hpp"
#include "tests/layer/layer_device.hpp"
#include "tests/support/device.hpp"
#include "tests/support/numeric.hpp"
#include "tests/support/random.hpp"

namespace {

using namespace moekit::test::layer;  // DevBuf, ParamBuffers, GradBuffers, download
using moekit::test::pack;
using namespace moekit::test::ep;

constexpr int kExpertsPerRank = 4;
constexpr int kTopK = 3;
constexpr int kHidden = 64;
constexpr int kInter = 32;
constexpr int kSharedInter = 32;

size_t dtype_bytes(moekit_dtype_t d) { return d == MOEKIT_DTYPE_F32 ? 4 : 2; }

// The whole problem, on the host (values already rounded to the dtype).
struct Problem {
  moekit_dtype_t dtype;
  int n;                         // ranks
  int E;                         // n * kExpertsPerRank
  std::vector<int64_t> tokens;   // T per rank
  std::vector<int64_t> offset;   // first global token of each rank
  std::vector<float> x, dy;      // [T_all, H]
  std::vector<uint8_t> mask;     // [T_all]
  std::vector<float> w_router;   // [E, H]
  std::vector<float> w_gate_up;  // [E, H, 2I]
  std::vector<float> w_down;     // [E, I, H]
  std::vector<float> s_gate_up;  // [H, 2 I_s]
  std::vector<float> s_down;     // [I_s, H]
  std::vector<float> correction; // fp32 correction bias [E] (selection only), or empty for none
  bool global_stats = false;     // EP layers sum load and aux statistics over the communicator
  float aux_coeff = 0.0f;        // the backward's aux-loss coefficient (nonzero only with global_stats)
  int64_t total() const { return offset[n]; }
};

// rank0_only: a correction bias of -10 on every expert outside rank 0's (softmax scores are in
// [0, 1], so no other expert is ever selected): the other ranks receive no row at all (exact mode
// plans over zero rows there) and every token stays on rank 0's experts.
Problem make_problem(moekit_dtype_t dtype, int n, uint64_t salt, bool rank0_only = false) {
  auto rng = moekit::test::make_rng(salt);
  Problem p;
  p.dtype = dtype;
  p.n = n;
  p.E = n * kExpertsPerRank;
  const int64_t counts[4] = {23, 0, 41, 17};  // rank 1 has no tokens
  p.offset.assign(n + 1, 0);
  for (int r = 0; r < n; ++r) {
    p.tokens.push_back(counts[r % 4]);
    p.offset[r + 1] = p.offset[r] + p.tokens[r];
  }
  const int64_t T = p.total(), H = kHidden;
  // Router inputs on a grid that makes every logit exact in fp32: x in multiples of 1/8 within
  // [-3/8, 3/8], W_r in multiples of 1/16 within [-2/16, 2/16]: each product is a multiple of
  // 2^-7 below 2^-4, 64 of them sum exactly.
  std::uniform_int_distribution<int> small(-3, 3), tiny(-2, 2);
  p.x.resize(T * H);
  for (auto& v : p.x) v = small(rng) / 8.0f;
  p.w_router.resize(static_cast<size_t>(p.E) * H);
  for (auto& v : p.w_router) v = tiny(rng) / 16.0f;
  p.dy = moekit::test::rounded(dtype, moekit::test::uniform(rng, T * H, -1.0f, 1.0f));
  p.mask.assign(T, 1);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (auto& m : p.mask) m = u(rng) < 0.1 ? 0 : 1;
  const float ws = 1.0f / std::sqrt(static_cast<float>(H)), wd = 1.0f / std::sqrt(static_cast<float>(kInter));
  p.w_gate_up = moekit::test::rounded(dtype, moekit::test::uniform(rng, size_t(p.E) * H * 2 * kInter, -ws, ws));
  p.w_down = moekit::test::rounded(dtype, moekit::test::uniform(rng, size_t(p.E) * kInter * H, -wd, wd));
  p.s_gate_up = moekit::test::rounded(dtype, moekit::test::uniform(rng, size_t(H) * 2 * kSharedInter, -ws, ws));
  p.s_down = moekit::test::rounded(dtype, moekit::test::uniform(rng, size_t(kSharedInter) * H, -wd, wd));
  if (rank0_only) {
    p.correction.assign(p.E, -10.0f);
    for (int e = 0; e < kExpertsPerRank; ++e) p.correction[e] = 0.0f;
  }
  return p;
}

// The EP handle's configuration for this problem (capacity mode: capacity 0 = max_tokens rows per
// pair, so nothing is ever dropped and the results match one GPU).
moekit_ep_config_t ep_config(const Problem& p, int64_t max_tokens, moekit_ep_mode_t mode) {
  moekit_ep_config_t e;
  moekit_ep_config_init(&e, sizeof(e));
  e.num_ranks = p.n;
  e.num_experts = p.E;
  e.top_k = kTopK;
  e.dtype = p.dtype;
  e.hidden = kHidden;
  e.max_tokens = max_tokens;
  e.mode = mode;
  e.capacity = 0;
  return e;
}

// The layer's configs (experts = the experts held here: E, or E / n with expert parallelism).
struct Configs {
  moekit_router_config_t router;
  moekit_experts_config_t experts;
  moekit_mlp_config_t shared;
  moekit_layer_config_t layer;
  Configs(const Problem& p, int experts_here, void* ep) {
    moekit_router_config_init(&router, sizeof(router));
    router.num_experts = p.E;
    router.top_k = kTopK;
    router.score_func = MOEKIT_SCORE_SOFTMAX;
    moekit_experts_config_init(&experts, sizeof(experts));
    experts.num_experts = experts_here;
    experts.hidden = kHidden;
    experts.inter = kInter;
    experts.dtype = p.dtype;
    experts.activation = MOEKIT_ACTIVATION_SWIGLU;
    moekit_mlp_config_init(&shared, sizeof(shared));
    shared.hidden = kHidden;
    shared.inter = kSharedInter;
    shared.dtype = p.dtype;
    moekit_layer_config_init(&layer, sizeof(layer));
    layer.hidden = kHidden;
    layer.dtype = p.dtype;
    layer.router = &router;
    layer.experts = &experts;
    layer.shared = &shared;
    layer.router_fp32 = 1;  // exact logits (see make_problem)
    layer.expert_parallel = ep;
    layer.ep_global_statistics = ep != nullptr && p.global_stats;
  }
};

// What one layer run (forward + backward) gives, as bytes.
struct Outputs {
  std::vector<uint8_t> y, dx, d_router, d_gate_up, d_down, d_s_gate_up, d_s_down, indices, load;
  int32_t dropped = -1;  // the saved view's ep_dropped (expert parallelism only)
  float aux_loss = NAN;
  bool operator==(const Outputs& o) const {
    return y == o.y && dx == o.dx && d_router == o.d_router && d_gate_up == o.d_gate_up && d_down == o.d_down &&
           d_s_gate_up == o.d_s_gate_up && d_s_down == o.d_s_down && indices == o.indices && load == o.load &&
           dropped == o.dropped && std::memcmp(&aux_loss, &o.aux_loss, 4) == 0;
  }
};

template <class V>
V slice(const V& all, int64_t first, int64_t count, int64_t width) {
  return V(all.begin() + first * width, all.begin() + (first + count) * width);
}

// One layer's device state for T tokens and the experts [e0, e0 + El); all allocation happens in
// the constructor (an allocation phase of run_ranks), every transfer on `stream`.
struct LayerRun {
  const Problem& p;
  int64_t T;
  int El;
  cudaStream_t stream;
  struct LayerDestroy {
    void operator()(moekit_layer_t l) const { moekit_layer_destroy(l); }
  };
  std::unique_ptr<moekit_layer, LayerDestroy> owned;  // destroyed after the buffers, also half-built
  moekit_layer_t layer = nullptr;
  size_t saved_bytes = 0, ws_bytes = 0;
  // Stream-ordered buffers and parameter/gradient sets of the layer suite (tests/layer/layer_device.hpp).
  DevBuf x, dy, mask, y, dx, load, aux, saved, workspace;
  ParamBuffers pb;
  GradBuffers gb;
  moekit_layer_params_t params;
  moekit_layer_grads_t grads;

  LayerRun(const Problem& prob, const Configs& cfg, int64_t first, int64_t count, int e0, int el, cudaStream_t s)
      : p(prob), T(count), El(el), stream(s) {
    const int64_t H = kHidden;
    const moekit_dtype_t d = p.dtype;
    moekit_check(moekit_layer_create(&cfg.layer, &layer), "moekit_layer_create");
    owned.reset(layer);
    size_t fw = 0, bw = 0;
    moekit_check(moekit_layer_saved_size(&cfg.layer, T, &saved_bytes), "moekit_layer_saved_size");
    moekit_check(moekit_layer_workspace_size(&cfg.layer, T, &fw, &bw), "moekit_layer_workspace_size");
    ws_bytes = std::max(fw, bw);
    const auto packed = [&](const std::vector<float>& v) { return DevBuf::from(pack(d, v), stream); };
    x = packed(slice(p.x, first, T, H));
    dy = packed(slice(p.dy, first, T, H));
    mask = DevBuf::from(slice(p.mask, first, T, 1), stream);
    pb.router_weight = packed(p.w_router);
    pb.w_gate_up = packed(slice(p.w_gate_up, e0, El, H * 2 * kInter));
    pb.w_down = packed(slice(p.w_down, e0, El, int64_t(kInter) * H));
    pb.shared_w_gate_up = packed(p.s_gate_up);
    pb.shared_w_down = packed(p.s_down);
    pb.correction_bias = DevBuf::from(p.correction, stream);  // empty (NULL) without one
    gb = GradBuffers::like(pb);  // (the correction bias has no gradient)
    const size_t es = dtype_bytes(d);
    y = DevBuf(T * H * es);
    dx = DevBuf(T * H * es);
    load = DevBuf(size_t(p.E) * 4);
    aux = DevBuf(4);
    saved = DevBuf(saved_bytes);
    workspace = DevBuf(ws_bytes);
    params = pb.pointers();
    grads = gb.pointers();
    cuda_check(cudaStreamSynchronize(stream), "uploads");  // before the first collective
  }

  // Poisons every output (stream-ordered: no allocation, no device-wide synchronisation).
  void poison() {
    for (const DevBuf* b : {&y, &dx, &load, &aux}) b->fill(0xa7, stream);
    for (const DevBuf* b : gb.all()) b->fill(0xa7, stream);
  }
  moekit_status_t forward() {
    return moekit_layer_forward(layer, T, T ? x.get() : nullptr, T ? mask.as<uint8_t>() : nullptr, &params,
                                T ? y.get() : nullptr, load.as<int32_t>(), aux.as<float>(), saved.get(), saved_bytes,
                                workspace.get(), ws_bytes, stream);
  }
  moekit_status_t backward() {
    return moekit_layer_backward(layer, T, T ? x.get() : nullptr, T ? mask.as<uint8_t>() : nullptr, &params,
                                 saved.get(), saved_bytes, T ? dy.get() : nullptr, p.aux_coeff, T ? dx.get() : nullptr,
                                 &grads, workspace.get(), ws_bytes, stream);
  }
  Outputs outputs(const Configs& cfg) const {
    Outputs o;
    o.y = download(y, stream);
    o.dx = download(dx, stream);
    o.d_router = download(gb.router_weight, stream);
    o.d_gate_up = download(gb.w_gate_up, stream);
    o.d_down = download(gb.w_down, stream);
    o.d_s_gate_up = download(gb.shared_w_gate_up, stream);
    o.d_s_down = download(gb.shared_w_down, stream);
    o.load = download(load, stream);
    o.aux_loss = download_as<float>(aux.get(), 1, stream)[0];
    moekit_layer_saved_view_t v;
    std::memset(&v, 0, sizeof(v));
    v.struct_size = sizeof(v);
    moekit_check(moekit_layer_saved_view(&cfg.layer, T, saved.get(), saved_bytes, &v), "moekit_layer_saved_view");
    o.indices = download(v.indices, static_cast<size_t>(T) * kTopK * 4, stream);
    if (v.ep_dropped != nullptr) o.dropped = download_as<int32_t>(v.ep_dropped, 1, stream)[0];
    return o;
  }
};

// One rank's EP handle and expert-parallel layer over its tokens and experts. Allocates (handle
// staging, layer, buffers): construct it in an allocation phase of run_ranks. Members go in reverse
// order, the layer before the handle it uses, also when construction stops half-way.
struct RankLayer {
  struct EpDestroy {
    void operator()(moekit_ep_handle_t h) const { moekit_ep_destroy(h); }
  };
  std::unique_ptr<moekit_ep, EpDestroy> handle;
  std::unique_ptr<Configs> cfg;
  std::unique_ptr<LayerRun> run;
  RankLayer(RankContext& ctx, const Problem& p, int64_t max_tokens, moekit_ep_mode_t mode) {
    const moekit_ep_config_t e = ep_config(p, max_tokens, mode);
    moekit_ep_handle_t h = nullptr;
    EP_REQUIRE_OK(ctx, moekit_ep_create(&e, ctx.comm, &h));
    handle.reset(h);
    cfg = std::make_unique<Configs>(p, kExpertsPerRank, h);
    crumb_step("LayerRun: cudaMalloc and uploads", __LINE__);
    const int r = ctx.rank;
    run = std::make_unique<LayerRun>(p, *cfg, p.offset[r], p.tokens[r], r * kExpertsPerRank, kExpertsPerRank,
                                     ctx.stream);
  }
};

// max |a - b| <= tol * max |b| over a tensor (both as values of dtype); the first offender named.
std::string compare(const char* what, moekit_dtype_t d, const std::vector<float>& a, const std::vector<float>& b,
                    double tol) {
  if (a.size() != b.size()) return std::string(what) + ": sizes differ";
  double scale = 0;
  for (float v : b) scale = std::max(scale, std::fabs(static_cast<double>(v)));
  for (size_t i = 0; i < a.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(a[i]) - b[i]);
    if (!(diff <= tol * scale + 1e-30)) {
      std::ostringstream s;
      s << what << "[" << i << "]: " << a[i] << " vs one GPU " << b[i] << " (tolerance " << tol << " x "
        << scale << ", dtype " << d << ")";
      return s.str();
    }
  }
  return "";
}

std::vector<float> values(moekit_dtype_t d, const std::vector<uint8_t>& bytes) {
  return moekit::test::unpack(d, bytes);
}

// global_stats: the EP layers sum load and aux statistics over the communicator, and the backward
// carries an aux-loss term (coefficient 0.37): the global batch's, as on one GPU.
void run_ep_layer_case(moekit_dtype_t dtype, moekit_ep_mode_t mode, int n, bool rank0_only = false,
                       bool global_stats = false) {
  Problem p = make_problem(dtype, n, 0xe9a7 + 16 * n + 4 * static_cast<int>(dtype) + mode, rank0_only);
  p.global_stats = global_stats;
  p.aux_coeff = global_stats ? 0.37f : 0.0f;
  const int64_t H = kHidden;
  const double tol = dtype == MOEKIT_DTYPE_F32 ? 1e-4 : 3e-2;
  INFO("dtype " << dtype << ", mode " << mode << ", ep = " << n << (rank0_only ? ", every token to rank 0" : "")
                << (global_stats ? ", global statistics and an aux term" : ""));

  // One GPU, the whole batch, every expert.
  Outputs one;
  {
    CUDA_REQUIRE(cudaSetDevice(0));
    cudaStream_t s;
    CUDA_REQUIRE(cudaStreamCreate(&s));
    {
      const Configs cfg(p, p.E, nullptr);
      LayerRun run(p, cfg, 0, p.total(), 0, p.E, s);
      run.poison();
      REQUIRE(run.forward() == MOEKIT_STATUS_SUCCESS);
      REQUIRE(run.backward() == MOEKIT_STATUS_SUCCESS);
      one = run.outputs(cfg);
    }
    CUDA_REQUIRE(cudaStreamDestroy(s));
  }

  // Expert parallel: rank r its tokens and its experts; two passes for determinism, and in
  // capacity mode a third replayed from a CUDA graph of the whole forward + backward.
  std::vector<Outputs> first(n), second(n), replayed(n);
  const int64_t max_tokens = *std::max_element(p.tokens.begin(), p.tokens.end());
  const std::vector<std::string> failures = run_ranks(n, [&](RankContext& ctx) {
    const int r = ctx.rank;
    RankLayer rank_layer(ctx, p, max_tokens, mode);
    LayerRun& run = *rank_layer.run;
    const Configs& cfg = *rank_layer.cfg;
    ctx.sync(__LINE__);  // end of the allocation phase
    for (int pass = 0; pass < 2; ++pass) {
      run.poison();
      EP_REQUIRE_OK(ctx, run.forward());
      EP_REQUIRE_OK(ctx, run.backward());
      (pass == 0 ? first : second)[r] = run.outputs(cfg);
    }
    if (mode == MOEKIT_EP_MODE_CAPACITY) {
      // Every earlier collective has completed (outputs() synchronised the stream): capturing and
      // instantiating cannot leave a peer waiting. Thread-local capture: each rank captures its own.
      ctx.sync(__LINE__);
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      EP_CUDA_OK(ctx, cudaStreamBeginCapture(ctx.stream, cudaStreamCaptureModeThreadLocal));
      const moekit_status_t f = run.forward();
      const moekit_status_t b = f == MOEKIT_STATUS_SUCCESS ? run.backward() : f;
      const std::string why = moekit_get_last_error();
      EP_CUDA_OK(ctx, cudaStreamEndCapture(ctx.stream, &graph));
      EP_CHECK(ctx, b == MOEKIT_STATUS_SUCCESS, "capturing the layer: " << moekit_status_string(b) << ": " << why);
      if (b != MOEKIT_STATUS_SUCCESS) throw RankAbort("capture failed");
      EP_CUDA_OK(ctx, cudaGraphInstantiate(&exec, graph, 0));
      ctx.sync(__LINE__);  // every rank instantiated before any launches
      run.poison();
      EP_CUDA_OK(ctx, cudaGraphLaunch(exec, ctx.stream));
      replayed[r] = run.outputs(cfg);
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    }
    ctx.sync(__LINE__);  // every collective issued: the destructors may free
  }, 60, "ep layer, ep = " + std::to_string(n) + ", " + moekit::test::dtype_name(dtype) + ", " +
             (mode == MOEKIT_EP_MODE_EXACT ? "exact" : "capacity") + (rank0_only ? ", every token to rank 0" : "") +
             (global_stats ? ", global statistics" : ""));
  for (const std::string& f : failures) UNSCOPED_INFO(f);
  REQUIRE(failures.empty());

  const size_t es = dtype_bytes(dtype);
  std::vector<double> router_sum(one.d_router.size() / es, 0.0), s_gu_sum(one.d_s_gate_up.size() / es, 0.0),
      s_down_sum(one.d_s_down.size() / es, 0.0);
  std::vector<int64_t> load_sum(p.E, 0);
  for (int r = 0; r < n; ++r) {
    INFO("rank " << r << " (" << p.tokens[r] << " tokens)");
    CHECK(first[r] == second[r]);  // bitwise, run after run
    if (mode == MOEKIT_EP_MODE_CAPACITY) CHECK(first[r] == replayed[r]);  // and from the graph
    const Outputs& o = first[r];
    CHECK(o.indices == slice(one.indices, p.offset[r] * kTopK * 4, p.tokens[r] * kTopK * 4, 1));
    CHECK(o.dropped == 0);  // capacity = max_tokens never drops
    if (global_stats) {  // the global batch's aux loss on every rank (S summed in another order)
      INFO("aux loss " << o.aux_loss << " vs one GPU " << one.aux_loss);
      CHECK(std::fabs(o.aux_loss - one.aux_loss) <= 1e-5 * std::fabs(one.aux_loss) + 1e-7);
    }
    std::vector<int32_t> load(p.E);
    std::memcpy(load.data(), o.load.data(), o.load.size());
    for (int i = 0; i < p.E; ++i) load_sum[i] += load[i];
    if (global_stats) CHECK(o.load == one.load);  // the global load, on every rank
    const int64_t el = kExpertsPerRank;
    const std::vector<std::string> diffs = {
        compare("y", dtype, values(dtype, o.y), values(dtype, slice(one.y, p.offset[r] * H * es, p.tokens[r] * H * es, 1)), tol),
        compare("dx", dtype, values(dtype, o.dx), values(dtype, slice(one.dx, p.offset[r] * H * es, p.tokens[r] * H * es, 1)), tol),
        compare("d w_gate_up", dtype, values(dtype, o.d_gate_up),
                values(dtype, slice(one.d_gate_up, r * el * H * 2 * kInter * es, el * H * 2 * kInter * es, 1)), tol),
        compare("d w_down", dtype, values(dtype, o.d_down),
                values(dtype, slice(one.d_down, r * el * kInter * H * es, el * kInter * H * es, 1)), tol),
    };
    for (const std::string& d : diffs) {
      INFO(d);
      CHECK(d.empty());
    }
    const std::vector<float> gr = values(dtype, o.d_router), sg = values(dtype, o.d_s_gate_up),
                             sd = values(dtype, o.d_s_down);
    for (size_t i = 0; i < gr.size(); ++i) router_sum[i] += gr[i];
    for (size_t i = 0; i < sg.size(); ++i) s_gu_sum[i] += sg[i];
    for (size_t i = 0; i < sd.size(); ++i) s_down_sum[i] += sd[i];
  }
  std::vector<int32_t> load_one(p.E);
  std::memcpy(load_one.data(), one.load.data(), one.load.size());
  // Per-rank loads add up to the global one; with global statistics every rank holds the global one.
  for (int i = 0; i < p.E; ++i) CHECK(load_sum[i] == (global_stats ? int64_t(n) : int64_t(1)) * load_one[i]);
  if (rank0_only)
    for (int i = kExpertsPerRank; i < p.E; ++i) CHECK(load_sum[i] == 0);  // really nothing elsewhere
  auto as_float = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  if (global_stats && dtype == MOEKIT_DTYPE_F32) {
    // The aux term must be visible at this tolerance, or the comparison below could not tell a
    // missing or per-rank term from the global one: one GPU without it differs.
    Problem q = p;
    q.aux_coeff = 0.0f;
    CUDA_REQUIRE(cudaSetDevice(0));
    cudaStream_t s;
    CUDA_REQUIRE(cudaStreamCreate(&s));
    std::vector<uint8_t> d_router_no_aux;
    {
      const Configs cfg(q, q.E, nullptr);
      LayerRun run(q, cfg, 0, q.total(), 0, q.E, s);
      run.poison();
      REQUIRE(run.forward() == MOEKIT_STATUS_SUCCESS);
      REQUIRE(run.backward() == MOEKIT_STATUS_SUCCESS);
      d_router_no_aux = download(run.gb.router_weight, s);
    }
    CUDA_REQUIRE(cudaStreamDestroy(s));
    CHECK_FALSE(compare("d router_weight", dtype, as_float(router_sum), values(dtype, d_router_no_aux), 2 * tol)
                    .empty());
  }
  // Each rank's contribution is rounded to the dtype before this sum: a little more room.
  for (const std::string& d :
       {compare("sum of d router_weight", dtype, as_float(router_sum), values(dtype, one.d_router), 2 * tol),
        compare("sum of d shared_w_gate_up", dtype, as_float(s_gu_sum), values(dtype, one.d_s_gate_up), 2 * tol),
        compare("sum of d shared_w_down", dtype, as_float(s_down_sum), values(dtype, one.d_s_down), 2 * tol)}) {
    INFO(d);
    CHECK(d.empty());
  }
}

}  // namespace

TEST_CASE("ep gpu: the expert-parallel layer equals the one-GPU layer over the global batch", "[gpu][ep][layer]") {
  for (int n : ep_sizes(false))
    for (moekit_dtype_t dtype : {MOEKIT_DTYPE_F32, MOEKIT_DTYPE_BF16})
      for (moekit_ep_mode_t mode : {MOEKIT_EP_MODE_EXACT, MOEKIT_EP_MODE_CAPACITY}) run_ep_layer_case(dtype, mode, n);
}

TEST_CASE("ep gpu: expert-parallel layer with global statistics carries the global batch's aux term",
          "[gpu][ep][layer]") {
  for (int n : ep_sizes(false)) {
    run_ep_layer_case(MOEKIT_DTYPE_F32, MOEKIT_EP_MODE_EXACT, n, false, true);
    run_ep_layer_case(MOEKIT_DTYPE_BF16, MOEKIT_EP_MODE_CAPACITY, n, false, true);
  }
}

TEST_CASE("ep gpu: expert-parallel layer ranks that receive no row at all", "[gpu][ep][layer]") {
  for (int n : ep_sizes(false)) {
    run_ep_layer_case(MOEKIT_DTYPE_F32, MOEKIT_EP_MODE_EXACT, n, true);
    run_ep_layer_case(MOEKIT_DTYPE_BF16, MOEKIT_EP_MODE_CAPACITY, n, true);
  }
}

TEST_CASE("ep gpu: the exact-mode layer refuses a capturing stream and a saved buffer it did not write",
          "[gpu][ep][layer]") {
  const int n = 2;
  if (device_count() < n) return;
  const Problem p = make_problem(MOEKIT_DTYPE_BF16, n, 0x5a7e);
  const int64_t max_tokens = *std::max_element(p.tokens.begin(), p.tokens.end());
  std::vector<moekit_status_t> capture(n), foreign(n);
  std::vector<std::string> capture_msg(n), foreign_msg(n);
  std::vector<bool> untouched(n, false);
  const std::vector<std::string> failures = run_ranks(n, [&](RankContext& ctx) {
    const int r = ctx.rank;
    RankLayer rank_layer(ctx, p, max_tokens, MOEKIT_EP_MODE_EXACT);
    LayerRun& run = *rank_layer.run;
    ctx.sync(__LINE__);
    run.poison();
    // A backward before any forward into this saved buffer: refused, nothing enqueued, no collective.
    foreign[r] = run.backward();
    foreign_msg[r] = moekit_get_last_error();
    // A capturing stream: refused before anything is enqueued (no collective either).
    cudaGraph_t graph = nullptr;
    EP_CUDA_OK(ctx, cudaStreamBeginCapture(ctx.stream, cudaStreamCaptureModeThreadLocal));
    capture[r] = run.forward();
    capture_msg[r] = moekit_get_last_error();
    EP_CUDA_OK(ctx, cudaStreamEndCapture(ctx.stream, &graph));
    size_t nodes = 1;
    EP_CUDA_OK(ctx, cudaGraphGetNodes(graph, nullptr, &nodes));
    EP_CHECK(ctx, nodes == 0, "the refused forward captured " << nodes << " nodes");
    cudaGraphDestroy(graph);
    const std::vector<uint8_t> dx = download(run.dx, ctx.stream), gr = download(run.gb.router_weight, ctx.stream);
    untouched[r] = std::all_of(dx.begin(), dx.end(), [](uint8_t b) { return b == 0xa7; }) &&
                   std::all_of(gr.begin(), gr.end(), [](uint8_t b) { return b == 0xa7; });
    ctx.sync(__LINE__);
  }, 60, "ep layer refusals");
  for (const std::string& f : failures) UNSCOPED_INFO(f);
  REQUIRE(failures.empty());
  for (int r = 0; r < n; ++r) {
    INFO("rank " << r << ": " << foreign_msg[r] << " / " << capture_msg[r]);
    CHECK(foreign[r] == MOEKIT_STATUS_INVALID_ARGUMENT);
    CHECK(foreign_msg[r].find("was not written by a successful forward of this layer") != std::string::npos);
    CHECK(capture[r] == MOEKIT_STATUS_INVALID_ARGUMENT);
    CHECK(capture_msg[r].find("is capturing") != std::string::npos);
    CHECK(untouched[r]);
  }
}

#endif  // MOEKIT_EP_TEST_HAVE_NCCL
