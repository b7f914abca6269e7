// moekit-bench-tokens: times the routing plan, permute, combine and both backwards on the issue's
// shapes, against the floor set by the device-to-device copy bandwidth measured in the same run.
//
//   moekit-bench-tokens --preset=all --json=out.json
//   moekit-bench-tokens --tokens=8192 --hidden=4096 --top-k=2 --experts=8 --dtype=bf16
//
// Presets (bf16 by default): deepseek (T=4096 H=7168 K=8 E=256), wide (T=16384 H=2048 K=8
// E=128), mixtral (T=8192 H=4096 K=2 E=8) and plan (T=16384 H=2048 K=8 E=256, the plan bar's
// shape). Overrides: --tokens --hidden --top-k --experts --alignment --capacity --drop=position|weight
// --dtype=bf16|f16|f32 --warmup --repeats --seed.
//
// Floor: every input read once from DRAM and every output written once, over the copy bandwidth
// (read + write bytes per second):
//   permute            T H (x) + total H (xp rows, padding included) + small plan/weight arrays
//   combine            real H (rows read) + T H (y)
//   permute backward   real H + T H, plus the gathered row-weight gradients
//   combine backward   T H (dy) + total H (dyp) + real H (yp, for the weight gradients)
// where real = rows that carry a slot (T K without drops or masks) and total includes padding.
// Every timed call reads its inputs from DRAM: the plan rotates over copies of the indices (and
// weights) and plans, the movement ops over copies of every tensor they touch, with enough
// copies that one round is at least twice the L2 (at least 2 copies while memory allows; the
// counts are in the JSON as rotated_copies).
// Before timing, the plan of every shape (and of every copy) is compared with the CPU reference
// and sampled tokens of every op are checked; a mismatch aborts.
// Also timed: plan_no_tokens, the plan call with T = 0 (its fixed cost: one plain launch of one
// block and the offsets scan; plan_no_tokens_fused the same through the cooperative launch and
// grid barrier of wider grids, plan_no_tokens_split on the two-launch path; the _graph rows: GPU
// time per call of the first two inside a CUDA graph of 64 calls), the plan's diagnostics,
// each right after 20 ms of memsets so that the GPU's clocks are at their working level
// (plan_busy: the plan row measured so; plan_split: the two-launch path, MOEKIT_PLAN_KERNELS=split; plan_warm: the same inputs and
// outputs every call, so no DRAM or TLB miss; plan_graph: GPU time per call of a CUDA graph of up
// to 64 plan calls over the rotation sets, i.e. without the host's launch cost), and the header's
// write bandwidth (cudaMemsetAsync), the ceiling of a
// write-mostly op such as permute.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench/common/bench_util.hpp"
#include "moekit/moekit.h"
#include "tests/reference/tokens_ref.hpp"
#include "tests/support/numeric.hpp"

namespace {

using moekit::bench::Json;
using Buffer = moekit::bench::DeviceBuffer;
using moekit::bench::router_indices;
using moekit::bench::rotation_copies;

struct Shape {
  std::string name;
  int64_t tokens;
  int64_t hidden;
  int top_k;
  int experts;
};

// Sets an environment variable for its lifetime (the library reads MOEKIT_PLAN_KERNELS on every
// plan call), then restores it.
struct ScopedEnv {
  std::string name, saved;
  bool had = false;
  ScopedEnv(const char* n, const char* value) : name(n) {
    if (const char* v = std::getenv(n)) {
      had = true;
      saved = v;
    }
    setenv(n, value, 1);
  }
  ~ScopedEnv() {
    if (had)
      setenv(name.c_str(), saved.c_str(), 1);
    else
      unsetenv(name.c_str());
  }
};

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "validation failed: %s\n", what.c_str());
  std::exit(2);
}

std::vector<float> random_values(std::mt19937_64& rng, moekit_dtype_t dt, size_t n) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = moekit::test::round_to(dt, d(rng));
  return v;
}

struct Result {
  std::string op;
  moekit::bench::Timing timing;
  double bytes;
  double floor_us;
};

void run_shape(const Shape& shape, const moekit::bench::Args& args, moekit_dtype_t dt,
               double copy_bw, cudaStream_t stream, Json& shapes_json,
               std::vector<std::string>& table) {
  const int64_t T = shape.tokens, H = shape.hidden;
  const int K = shape.top_k, E = shape.experts;
  const size_t es = moekit::test::dtype_bytes(dt);
  const int warmup = static_cast<int>(args.get_int("warmup", 10));
  const int repeats = static_cast<int>(args.get_int("repeats", 50));
  moekit_plan_config_t cfg;
  BENCH_OK(moekit_plan_config_init(&cfg, sizeof(cfg)));
  cfg.num_experts = E;
  cfg.top_k = K;
  cfg.alignment = static_cast<int32_t>(args.get_int("alignment", 1));
  cfg.capacity = static_cast<int32_t>(args.get_int("capacity", 0));
  cfg.drop_policy = args.get("drop", "position") == "weight" ? MOEKIT_DROP_BY_WEIGHT : MOEKIT_DROP_BY_POSITION;
  BENCH_OK(moekit_plan_config_check(&cfg));

  std::mt19937_64 rng(static_cast<uint64_t>(args.get_int("seed", 1234)));
  const auto indices = router_indices(rng, T, K, E);
  const auto weights = moekit::bench::router_weights(rng, static_cast<size_t>(T) * K);
  int64_t max_rows = 0;
  size_t ws_bytes = 0, plan_bytes = 0;
  BENCH_OK(moekit_plan_max_rows(&cfg, T, &max_rows));
  BENCH_OK(moekit_plan_workspace_size(&cfg, T, &ws_bytes));
  BENCH_OK(moekit_plan_buffer_size(&cfg, T, &plan_bytes));
  const size_t slots = static_cast<size_t>(T) * K;
  const size_t token_bytes = static_cast<size_t>(T) * H * es;
  const size_t rows_bytes = static_cast<size_t>(max_rows) * H * es;
  Buffer ws(ws_bytes);

  // Rotation sets: the plan's inputs with the plan they build, and every tensor a movement op
  // touches. Set 0 is validated; the others are copies of it (checked too).
  struct PlanSet {
    Buffer idx, w, buf;
    moekit_token_plan_t plan{};
    PlanSet(size_t n_slots, size_t plan_buffer) : idx(n_slots * 4), w(n_slots * 4), buf(plan_buffer) {}
  };
  struct MoveSet {
    Buffer x, xp, rw, y, dyp, dw, dx, dw2;
    MoveSet(size_t token, size_t rows, int64_t n_rows, size_t n_slots)
        : x(token), xp(rows), rw(n_rows * 4), y(token), dyp(rows), dw(n_slots * 4), dx(token), dw2(n_slots * 4) {}
  };
  const double plan_set_bytes = slots * 8.0 + plan_bytes;
  const double move_set_bytes = 4.0 * token_bytes + 2.0 * rows_bytes + max_rows * 4.0 + slots * 8.0;
  std::vector<std::unique_ptr<PlanSet>> plans;
  std::vector<std::unique_ptr<MoveSet>> moves;
  auto add_plan_set = [&] {
    plans.push_back(std::make_unique<PlanSet>(slots, plan_bytes));
    PlanSet& ps = *plans.back();
    ps.idx.upload(indices);
    ps.w.upload(weights);
    BENCH_OK(moekit_token_plan_init(&ps.plan, sizeof(ps.plan)));
    BENCH_OK(moekit_plan_bind(&cfg, T, ps.buf.p, plan_bytes, &ps.plan));
  };
  auto build = [&](const PlanSet& ps) {
    BENCH_OK(moekit_plan_build(&cfg, T, ps.idx.as<int32_t>(), ps.w.as<float>(), nullptr, &ps.plan, ws.p,
                                ws_bytes, stream));
  };
  add_plan_set();
  moves.push_back(std::make_unique<MoveSet>(token_bytes, rows_bytes, max_rows, slots));
  const PlanSet& p0 = *plans[0];
  MoveSet& m0 = *moves[0];
  const auto x = random_values(rng, dt, T * H);
  m0.x.upload(moekit::test::pack(dt, x));

  // ---- validate ----
  build(p0);
  BENCH_CUDA(cudaStreamSynchronize(stream));
  const auto ref_cfg = moekit::ref::resolve(cfg);
  const auto want = moekit::ref::build_plan(ref_cfg, T, indices, weights, {});
  auto check_plan = [&](const PlanSet& ps) {
    std::vector<int32_t> got_rows(slots), got_totals(3);
    if (slots) BENCH_CUDA(cudaMemcpy(got_rows.data(), ps.plan.row_of_slot, slots * 4, cudaMemcpyDeviceToHost));
    BENCH_CUDA(cudaMemcpy(got_totals.data(), ps.plan.totals, 12, cudaMemcpyDeviceToHost));
    if (got_rows != want.row_of_slot) die(shape.name + ": row_of_slot differs from the reference");
    if (got_totals[0] != want.total || got_totals[1] != want.dropped || got_totals[2] != want.invalid)
      die(shape.name + ": totals differ from the reference");
  };
  check_plan(p0);
  const int64_t total = want.total;
  int64_t real = 0;
  for (int32_t r : want.row_of_slot) real += r >= 0;
  BENCH_OK(moekit_tokens_permute(&cfg, &p0.plan, T, H, dt, m0.x.p, H, p0.w.as<float>(), m0.xp.p, m0.rw.as<float>(),
                                  stream));
  BENCH_OK(moekit_tokens_combine(&cfg, &p0.plan, T, H, dt, m0.xp.p, p0.w.as<float>(), m0.y.p, H, stream));
  BENCH_CUDA(cudaStreamSynchronize(stream));
  if (T > 0) {
    // Sampled tokens: every row of the token equals x[t]; y[t] = sum_k w x[t] within tolerance.
    std::uniform_int_distribution<int64_t> pick(0, T - 1);
    const auto tol = moekit::test::tolerance_for(dt);
    for (int i = 0; i < 64; ++i) {
      const int64_t t = pick(rng);
      std::vector<uint8_t> bytes(H * es);
      double wsum = 0;
      for (int k = 0; k < K; ++k) {
        const int32_t r = want.row_of_slot[t * K + k];
        if (r < 0) continue;
        wsum += weights[t * K + k];
        BENCH_CUDA(cudaMemcpy(bytes.data(), m0.xp.as<char>() + r * H * es, H * es, cudaMemcpyDeviceToHost));
        const auto row = moekit::test::unpack(dt, bytes);
        for (int64_t h = 0; h < H; ++h)
          if (row[h] != x[t * H + h]) die(shape.name + ": permuted row differs from its token");
      }
      BENCH_CUDA(cudaMemcpy(bytes.data(), m0.y.as<char>() + t * H * es, H * es, cudaMemcpyDeviceToHost));
      const auto got = moekit::test::unpack(dt, bytes);
      for (int64_t h = 0; h < H; ++h)
        if (!moekit::test::close(got[h], moekit::test::round_to(dt, static_cast<float>(wsum * x[t * H + h])), tol))
          die(shape.name + ": combined token differs from the reference");
    }
  }

  // ---- rotation copies ----
  const double row_bytes = static_cast<double>(H) * es;
  const double permute_bytes = T * row_bytes + total * row_bytes + T * K * 8.0 + total * 4.0;
  const double combine_bytes = real * row_bytes + T * row_bytes + T * K * 8.0;
  const double combine_unweighted_bytes = real * row_bytes + T * row_bytes + T * K * 4.0;
  const double permute_backward_bytes = real * row_bytes + T * row_bytes + T * K * 12.0;
  const double combine_backward_bytes = T * row_bytes + total * row_bytes + real * row_bytes + T * K * 12.0;
  const double plan_call_bytes = T * K * 4.0 * 2 + total * 4.0;  // indices, row_of_slot, slot_of_row
  const int l2_int = moekit::bench::l2_cache_bytes();
  const double l2 = l2_int;
  size_t free_bytes = 0, device_bytes = 0;
  BENCH_CUDA(cudaMemGetInfo(&free_bytes, &device_bytes));
  const double spare = 0.8 * static_cast<double>(free_bytes);  // what the further copies may use
  const int plan_copies = rotation_copies(plan_call_bytes, plan_set_bytes, l2, 0.1 * spare + plan_set_bytes);
  const double smallest_move = std::min({permute_bytes, combine_bytes, combine_unweighted_bytes,
                                         permute_backward_bytes, combine_backward_bytes});
  const int move_copies = rotation_copies(smallest_move, move_set_bytes, l2, 0.9 * spare + move_set_bytes);
  while (static_cast<int>(plans.size()) < plan_copies) {
    add_plan_set();
    build(*plans.back());
  }
  BENCH_CUDA(cudaStreamSynchronize(stream));
  for (const auto& ps : plans) check_plan(*ps);
  while (static_cast<int>(moves.size()) < move_copies) {
    moves.push_back(std::make_unique<MoveSet>(token_bytes, rows_bytes, max_rows, slots));
    MoveSet& m = *moves.back();
    // The inputs the ops read: x (also dy), xp (also yp and dxp) and rw (also d_row_weights).
    BENCH_CUDA(cudaMemcpy(m.x.p, m0.x.p, token_bytes, cudaMemcpyDeviceToDevice));
    BENCH_CUDA(cudaMemcpy(m.xp.p, m0.xp.p, rows_bytes, cudaMemcpyDeviceToDevice));
    BENCH_CUDA(cudaMemcpy(m.rw.p, m0.rw.p, max_rows * 4, cudaMemcpyDeviceToDevice));
  }
  auto P = [&](int i) -> const PlanSet& { return *plans[i % plan_copies]; };
  auto M = [&](int i) -> MoveSet& { return *moves[i % move_copies]; };

  // ---- time ----
  std::vector<Result> results;
  auto floor_us = [&](double bytes) { return bytes / copy_bw * 1e6; };
  // run(i) gets a call counter that keeps counting from the warm-up into the timed calls, so the
  // first timed calls do not reuse the sets the warm-up just touched.
  auto time_op = [&](const char* op, double bytes, const std::function<void(int)>& run) {
    int calls = 0;
    const auto t = moekit::bench::time_us(stream, warmup, repeats, [&](int) { run(calls++); });
    results.push_back({op, t, bytes, floor_us(bytes)});
  };
  time_op("plan", plan_call_bytes, [&](int i) { build(P(i)); });
  {
    // The plan's diagnostics (see the file comment): the two-launch path, the same set every call
    // (inputs and outputs warm in L2 and the TLB), and the GPU time per call with no host launch
    // cost (a graph of `calls` builds over the rotation sets, timed as one launch).
    // The plan is the first op timed after the shape's host-side setup (random inputs and
    // validation: the GPU idles for a fraction of a second), and its 60 calls last about 2 ms, so
    // "plan" may run while the GPU's clocks are still climbing out of idle. Every diagnostic row
    // is timed right after `busy_ms` of device-wide memsets instead, as the plan runs inside a
    // training step; plan_busy is the plan row measured that way.
    auto keep_busy = [&] {
      const double busy_ms = 20.0;
      if (m0.dyp.bytes == 0) return;
      const int memsets = static_cast<int>(std::ceil(busy_ms * 1e-3 * copy_bw / static_cast<double>(m0.dyp.bytes)));
      for (int i = 0; i < memsets; ++i) BENCH_CUDA(cudaMemsetAsync(m0.dyp.p, 0, m0.dyp.bytes, stream));  // an output only
    };
    keep_busy();
    time_op("plan_busy", plan_call_bytes, [&](int i) { build(P(i)); });
    {
      ScopedEnv env("MOEKIT_PLAN_KERNELS", "split");
      keep_busy();
      time_op("plan_split", plan_call_bytes, [&](int i) { build(P(i)); });
    }
    keep_busy();
    time_op("plan_warm", plan_call_bytes, [&](int) { build(P(0)); });
    const int calls = std::min(plan_copies, 64);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    BENCH_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < calls; ++i) build(P(i));
    BENCH_CUDA(cudaStreamEndCapture(stream, &graph));
    BENCH_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    const int graph_warmup = std::max(1, warmup / 4), graph_repeats = std::max(3, repeats / 4);
    keep_busy();
    moekit::bench::Timing t = moekit::bench::time_us(stream, graph_warmup, graph_repeats, [&](int) {
      BENCH_CUDA(cudaGraphLaunch(exec, stream));
    });
    t.median_us /= calls;
    t.min_us /= calls;
    t.max_us /= calls;
    results.push_back({"plan_graph", t, plan_call_bytes, floor_us(plan_call_bytes)});
    BENCH_CUDA(cudaGraphExecDestroy(exec));
    BENCH_CUDA(cudaGraphDestroy(graph));
  }
  {
    // The same call with T = 0: the one-block kernel (a plain launch, the offsets scan over
    // E_local) with no slot to read, i.e. the plan's fixed cost on this device and host;
    // plan_no_tokens_fused the same call forced through the cooperative launch and its grid
    // barrier (what a call with more than one block pays on top), plan_no_tokens_split two launches.
    size_t empty_ws = 0, empty_buf = 0;
    BENCH_OK(moekit_plan_workspace_size(&cfg, 0, &empty_ws));
    BENCH_OK(moekit_plan_buffer_size(&cfg, 0, &empty_buf));
    Buffer ews(empty_ws), ebuf(empty_buf);
    moekit_token_plan_t empty{};
    BENCH_OK(moekit_token_plan_init(&empty, sizeof(empty)));
    BENCH_OK(moekit_plan_bind(&cfg, 0, ebuf.p, empty_buf, &empty));
    auto empty_build = [&] {
      BENCH_OK(moekit_plan_build(&cfg, 0, nullptr, nullptr, nullptr, &empty, ews.p, empty_ws, stream));
    };
    // GPU time per call of a graph of 64 such calls: what is left without the host's launch path.
    auto empty_graph = [&](const char* op) {
      const int calls = 64;
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      BENCH_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      for (int i = 0; i < calls; ++i) empty_build();
      BENCH_CUDA(cudaStreamEndCapture(stream, &graph));
      BENCH_CUDA(cudaGraphInstantiate(&exec, graph, 0));
      moekit::bench::Timing t = moekit::bench::time_us(stream, std::max(1, warmup / 4), std::max(3, repeats / 4),
                                                       [&](int) { BENCH_CUDA(cudaGraphLaunch(exec, stream)); });
      t.median_us /= calls;
      t.min_us /= calls;
      t.max_us /= calls;
      results.push_back({op, t, 0.0, 0.0});
      BENCH_CUDA(cudaGraphExecDestroy(exec));
      BENCH_CUDA(cudaGraphDestroy(graph));
    };
    time_op("plan_no_tokens", 0.0, [&](int) { empty_build(); });
    empty_graph("plan_no_tokens_graph");
    {
      ScopedEnv env("MOEKIT_PLAN_KERNELS", "fused");
      time_op("plan_no_tokens_fused", 0.0, [&](int) { empty_build(); });
      empty_graph("plan_no_tokens_fused_graph");
    }
    ScopedEnv env("MOEKIT_PLAN_KERNELS", "split");
    time_op("plan_no_tokens_split", 0.0, [&](int) { empty_build(); });
  }
  time_op("permute", permute_bytes, [&](int i) {
    BENCH_OK(moekit_tokens_permute(&cfg, &P(i).plan, T, H, dt, M(i).x.p, H, P(i).w.as<float>(), M(i).xp.p,
                                    M(i).rw.as<float>(), stream));
  });
  time_op("combine", combine_bytes, [&](int i) {
    BENCH_OK(moekit_tokens_combine(&cfg, &P(i).plan, T, H, dt, M(i).xp.p, P(i).w.as<float>(), M(i).y.p, H, stream));
  });
  time_op("combine_unweighted", combine_unweighted_bytes, [&](int i) {
    BENCH_OK(moekit_tokens_combine(&cfg, &P(i).plan, T, H, dt, M(i).xp.p, nullptr, M(i).y.p, H, stream));
  });
  time_op("permute_backward", permute_backward_bytes, [&](int i) {
    BENCH_OK(moekit_tokens_permute_backward(&cfg, &P(i).plan, T, H, dt, M(i).xp.p, M(i).rw.as<float>(), M(i).dx.p,
                                             H, M(i).dw2.as<float>(), stream));
  });
  time_op("combine_backward", combine_backward_bytes, [&](int i) {
    BENCH_OK(moekit_tokens_combine_backward(&cfg, &P(i).plan, T, H, dt, M(i).x.p, H, P(i).w.as<float>(), M(i).xp.p,
                                             M(i).dyp.p, M(i).dw.as<float>(), stream));
  });
  BENCH_CUDA(cudaGetLastError());

  Json ops = Json::array();
  for (const auto& r : results) {
    const double fraction = r.floor_us / r.timing.median_us;
    std::string bar = "";
    const bool big = shape.name == "deepseek" || shape.name == "wide";
    if (r.op == "permute" && big) bar = fraction >= 0.85 ? "bar 85% met" : "bar 85% MISSED";
    if (r.op == "combine" && big) bar = fraction >= 0.80 ? "bar 80% met" : "bar 80% MISSED";
    if (r.op == "plan" && T == 16384 && K == 8 && E == 256)
      bar = r.timing.median_us < 20.0 ? "bar 20 us met" : "bar 20 us MISSED";
    if (r.op == "plan_no_tokens") bar = "fixed cost (T = 0)";
    if (r.op == "plan_no_tokens_split") bar = "fixed cost (T = 0), two launches";
    if (r.op == "plan_no_tokens_fused") bar = "fixed cost (T = 0), cooperative launch";
    if (r.op == "plan_no_tokens_graph") bar = "T = 0, GPU time per call in a graph";
    if (r.op == "plan_no_tokens_fused_graph") bar = "T = 0 cooperative, GPU time per call in a graph";
    if (r.op == "plan_busy") bar = "after 20 ms of memsets";
    if (r.op == "plan_split") bar = "two launches";
    if (r.op == "plan_warm") bar = "same set every call";
    if (r.op == "plan_graph") bar = "GPU time per call in a graph";
    char line[256];
    std::snprintf(line, sizeof(line), "%-9s %-26s %10.1f %10.1f %9.1f %8.1f%%  %s", shape.name.c_str(),
                  r.op.c_str(), r.timing.median_us, r.bytes / (r.timing.median_us * 1e-6) / 1e9, r.floor_us,
                  100.0 * fraction, bar.c_str());
    table.push_back(line);
    ops.push(Json::object()
                 .set("op", r.op)
                 .set("median_us", r.timing.median_us)
                 .set("min_us", r.timing.min_us)
                 .set("max_us", r.timing.max_us)
                 .set("repeats", r.timing.repeats)
                 .set("bytes", r.bytes)
                 .set("gbps", r.bytes / (r.timing.median_us * 1e-6) / 1e9)
                 .set("floor_us", r.floor_us)
                 .set("fraction_of_floor", fraction)
                 .set("bar", bar));
  }
  shapes_json.push(Json::object()
                       .set("name", shape.name)
                       .set("tokens", T)
                       .set("hidden", H)
                       .set("top_k", K)
                       .set("experts", E)
                       .set("alignment", static_cast<int64_t>(cfg.alignment))
                       .set("capacity", static_cast<int64_t>(cfg.capacity))
                       .set("dtype", args.get("dtype", "bf16"))
                       .set("total_rows", total)
                       .set("real_rows", real)
                       .set("max_rows", max_rows)
                       .set("l2_bytes", static_cast<int64_t>(l2_int))
                       .set("plan_rotated_copies", plan_copies)
                       .set("move_rotated_copies", move_copies)
                       .set("ops", ops));
}

}  // namespace

int main(int argc, char** argv) {
  moekit::bench::Args args(argc, argv);
  if (args.has("help")) {
    std::printf(
        "moekit-bench-tokens [--preset=deepseek|wide|mixtral|plan|all] [--tokens=T --hidden=H --top-k=K "
        "--experts=E] [--alignment=A --capacity=C --drop=position|weight] [--dtype=bf16|f16|f32] "
        "[--warmup=10 --repeats=50 --seed=1234] [--json=path]\n");
    return 0;
  }
  const std::vector<Shape> presets = {{"deepseek", 4096, 7168, 8, 256},
                                      {"wide", 16384, 2048, 8, 128},
                                      {"mixtral", 8192, 4096, 2, 8},
                                      {"plan", 16384, 2048, 8, 256}};
  std::vector<Shape> shapes;
  const std::string preset = args.get("preset", args.has("tokens") ? "" : "all");
  for (const auto& p : presets)
    if (preset == "all" || preset == p.name) shapes.push_back(p);
  if (!preset.empty() && shapes.empty()) die("unknown --preset=" + preset);
  if (preset.empty()) {
    shapes.push_back({"custom", args.get_int("tokens", 4096), args.get_int("hidden", 4096),
                      static_cast<int>(args.get_int("top-k", 8)), static_cast<int>(args.get_int("experts", 64))});
  } else {
    for (auto& s : shapes) {  // overrides apply to presets too
      s.tokens = args.get_int("tokens", s.tokens);
      s.hidden = args.get_int("hidden", s.hidden);
      s.top_k = static_cast<int>(args.get_int("top-k", s.top_k));
      s.experts = static_cast<int>(args.get_int("experts", s.experts));
    }
  }
  const moekit_dtype_t dt = moekit::bench::parse_dtype(args.get("dtype", "bf16"));
  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreate(&stream));
  const double copy_bw = moekit::bench::measure_copy_bandwidth(stream);
  const double write_bw = moekit::bench::measure_write_bandwidth(stream);
  std::printf("device: %s, copy bandwidth %.0f GB/s (read + write), write bandwidth %.0f GB/s (memset), commit %s\n",
              moekit::bench::device_description().c_str(), copy_bw / 1e9, write_bw / 1e9,
              moekit::bench::build_commit().c_str());

  Json shapes_json = Json::array();
  std::vector<std::string> table;
  for (const auto& s : shapes) run_shape(s, args, dt, copy_bw, stream, shapes_json, table);

  std::printf("\n%-9s %-26s %10s %10s %9s %9s\n", "shape", "op", "median_us", "GB/s", "floor_us", "of floor");
  for (const auto& line : table) std::printf("%s\n", line.c_str());

  if (args.has("json")) {
    Json root = Json::object()
                    .set("benchmark", "moekit-bench-tokens")
                    .set("device", moekit::bench::device_description())
                    .set("commit", moekit::bench::build_commit())
                    .set("date", moekit::bench::utc_now())
                    .set("copy_bandwidth_gbps", copy_bw / 1e9)
                    .set("write_bandwidth_gbps", write_bw / 1e9)
                    .set("floor", "each input read once and each output written once, over the measured copy bandwidth")
                    .set("shapes", shapes_json);
    if (!moekit::bench::write_file(args.get("json", ""), root.dump())) die("cannot write " + args.get("json", ""));
    std::printf("wrote %s\n", args.get("json", "").c_str());
  }
  cudaStreamDestroy(stream);
  return 0;
}
