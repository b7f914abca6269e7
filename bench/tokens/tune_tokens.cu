// moekit-tune-tokens: the tuning benchmark behind the scatter numbers of kernels/tokens/tuning.hpp
// (kMoveScatterUnroll, kMoveStreamingStores). It compiles the movement kernels itself with every
// candidate -- the accesses per pass of permute (4, the 0.1 value, or 8) and plain or streaming
// (st.global.cs) row stores -- and times them side by side on the issue's shapes, in the same run
// as the device's copy bandwidth (the floor of moekit-bench-tokens) and its write bandwidth
// (cudaMemsetAsync, the ceiling of an op that mostly writes). Combine backward, the other
// scatter, is timed with plain and streaming stores. Before timing, each candidate's rows are
// compared bitwise with those of the library's call.
//
//   moekit-tune-tokens [--preset=deepseek|wide|mixtral|all] [--warmup=10 --repeats=50] [--json=path]
//
// Rotation: every call alternates between copies of x and of the row buffers, enough copies that
// one round of calls touches at least twice the L2 (as moekit-bench-tokens does).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench/common/bench_util.hpp"
#include "kernels/tokens/movement.cuh"
#include "moekit/moekit.h"

namespace {

namespace kt = moekit::kernels::tokens;
using moekit::bench::Json;
using DeviceBuf = moekit::bench::DeviceBuffer;

struct Shape {
  const char* name;
  int64_t tokens, hidden;
  int top_k, experts;
};

using Launch = cudaError_t (*)(const kt::MoveArgs&, cudaStream_t);
using T = __nv_bfloat16;
constexpr int V = 8;  // 16-byte accesses of bf16

struct Candidate {
  const char* op;     // "permute" or "combine_backward"
  const char* name;
  int scatter_unroll;
  bool streaming;
  Launch launch;
};

const Candidate kCandidates[] = {
    {"permute", "4 accesses, plain stores (0.1)", 4, false, kt::launch_move_op<T, V, kt::MoveOp::kPermute, 4, false>},
    {"permute", "8 accesses, plain stores", 8, false, kt::launch_move_op<T, V, kt::MoveOp::kPermute, 8, false>},
    {"permute", "4 accesses, streaming stores", 4, true, kt::launch_move_op<T, V, kt::MoveOp::kPermute, 4, true>},
    {"permute", "8 accesses, streaming stores", 8, true, kt::launch_move_op<T, V, kt::MoveOp::kPermute, 8, true>},
    {"combine_backward", "plain stores", kt::kMoveScatterUnroll, false,
     kt::launch_move_op<T, V, kt::MoveOp::kCombineBackward, kt::kMoveScatterUnroll, false>},
    {"combine_backward", "streaming stores", kt::kMoveScatterUnroll, true,
     kt::launch_move_op<T, V, kt::MoveOp::kCombineBackward, kt::kMoveScatterUnroll, true>},
};

bool is_default(const Candidate& c) {
  const bool unroll_matters = std::string(c.op) == "permute";
  return c.streaming == kt::kMoveStreamingStores && (!unroll_matters || c.scatter_unroll == kt::kMoveScatterUnroll);
}

std::vector<uint8_t> download(const void* p, size_t bytes) {
  std::vector<uint8_t> v(bytes);
  if (bytes) BENCH_CUDA(cudaMemcpy(v.data(), p, bytes, cudaMemcpyDeviceToHost));
  return v;
}

void run_shape(const Shape& shape, const moekit::bench::Args& args, double copy_bw, double write_bw,
               cudaStream_t stream, Json& shapes_json, std::vector<std::string>& table) {
  const int64_t T_ = shape.tokens, H = shape.hidden;
  const int K = shape.top_k, E = shape.experts;
  const size_t es = sizeof(T);
  const int warmup = static_cast<int>(args.get_int("warmup", 10));
  const int repeats = static_cast<int>(args.get_int("repeats", 50));

  moekit_plan_config_t cfg;
  BENCH_OK(moekit_plan_config_init(&cfg, sizeof(cfg)));
  cfg.num_experts = E;
  cfg.top_k = K;
  int64_t max_rows = 0;
  size_t ws_bytes = 0, plan_bytes = 0;
  BENCH_OK(moekit_plan_max_rows(&cfg, T_, &max_rows));
  BENCH_OK(moekit_plan_workspace_size(&cfg, T_, &ws_bytes));
  BENCH_OK(moekit_plan_buffer_size(&cfg, T_, &plan_bytes));

  // Router-like routing: K distinct uniformly random experts per token; weights in (0, 1).
  std::mt19937_64 rng(static_cast<uint64_t>(args.get_int("seed", 1234)));
  const size_t slots = static_cast<size_t>(T_) * K;
  const std::vector<int32_t> indices = moekit::bench::router_indices(rng, T_, K, E);
  const std::vector<float> weights = moekit::bench::router_weights(rng, slots);

  DeviceBuf d_idx(slots * 4), d_w(slots * 4), d_plan(plan_bytes), d_ws(ws_bytes), d_rw(max_rows * 4),
      d_dw(slots * 4);
  BENCH_CUDA(cudaMemcpy(d_idx.p, indices.data(), slots * 4, cudaMemcpyHostToDevice));
  BENCH_CUDA(cudaMemcpy(d_w.p, weights.data(), slots * 4, cudaMemcpyHostToDevice));
  moekit_token_plan_t plan;
  BENCH_OK(moekit_token_plan_init(&plan, sizeof(plan)));
  BENCH_OK(moekit_plan_bind(&cfg, T_, d_plan.p, plan_bytes, &plan));
  BENCH_OK(moekit_plan_build(&cfg, T_, static_cast<const int32_t*>(d_idx.p), static_cast<const float*>(d_w.p),
                            nullptr, &plan, d_ws.p, ws_bytes, stream));
  int32_t total = 0;
  BENCH_CUDA(cudaMemcpyAsync(&total, plan.totals, 4, cudaMemcpyDeviceToHost, stream));
  BENCH_CUDA(cudaStreamSynchronize(stream));

  // Rotation sets: x (also dy), xp (also yp) and dyp.
  const size_t token_bytes = static_cast<size_t>(T_) * H * es;
  const size_t rows_bytes = static_cast<size_t>(max_rows) * H * es;
  const double per_call = static_cast<double>(token_bytes) + static_cast<double>(total) * H * es;
  const int copies = moekit::bench::rotation_copies(per_call, static_cast<double>(token_bytes) + 2.0 * rows_bytes,
                                                    moekit::bench::l2_cache_bytes(),
                                                    std::numeric_limits<double>::infinity());
  struct Set {
    DeviceBuf x, xp, dyp;
    Set(size_t token, size_t rows) : x(token), xp(rows), dyp(rows) {}
  };
  std::vector<std::unique_ptr<Set>> sets;
  {
    std::vector<uint16_t> x(static_cast<size_t>(T_) * H);
    std::uniform_int_distribution<int> bits(0, 0xffff);
    for (auto& v : x) {
      v = static_cast<uint16_t>(bits(rng));
      if ((v & 0x7f80) == 0x7f80) v &= 0xbfff;  // finite values only
    }
    for (int c = 0; c < copies; ++c) {
      sets.push_back(std::make_unique<Set>(token_bytes, rows_bytes));
      BENCH_CUDA(cudaMemcpy(sets.back()->x.p, x.data(), token_bytes, cudaMemcpyHostToDevice));
    }
  }

  kt::MoveArgs base{};
  base.num_tokens = T_;
  base.top_k = K;
  base.num_local = E;
  base.alignment = 1;
  base.max_rows = static_cast<int32_t>(max_rows);
  base.hidden = H;
  base.row_of_slot = plan.row_of_slot;
  base.expert_counts = plan.expert_counts;
  base.expert_offsets = plan.expert_offsets;
  base.token_in_stride = H;
  base.token_out_stride = H;
  base.weights = static_cast<const float*>(d_w.p);
  auto args_for = [&](const Candidate& c, Set& s) {
    kt::MoveArgs a = base;
    if (std::string(c.op) == "permute") {
      a.op = kt::MoveOp::kPermute;
      a.token_in = s.x.p;
      a.rows_out = s.xp.p;
      a.row_weights = static_cast<float*>(d_rw.p);
    } else {
      a.op = kt::MoveOp::kCombineBackward;
      a.token_in = s.x.p;
      a.rows_in = s.xp.p;
      a.rows_out = s.dyp.p;
      a.grad_weights = static_cast<float*>(d_dw.p);
    }
    return a;
  };

  // Validate: every candidate's rows equal the library's, bit for bit.
  Set& s0 = *sets[0];
  const size_t used_rows_bytes = static_cast<size_t>(total) * H * es;
  BENCH_OK(moekit_tokens_permute(&cfg, &plan, T_, H, MOEKIT_DTYPE_BF16, s0.x.p, H, static_cast<const float*>(d_w.p),
                                s0.xp.p, static_cast<float*>(d_rw.p), stream));
  BENCH_OK(moekit_tokens_combine_backward(&cfg, &plan, T_, H, MOEKIT_DTYPE_BF16, s0.x.p, H,
                                         static_cast<const float*>(d_w.p), s0.xp.p, s0.dyp.p,
                                         static_cast<float*>(d_dw.p), stream));
  BENCH_CUDA(cudaStreamSynchronize(stream));
  const auto want_xp = download(s0.xp.p, used_rows_bytes);
  const auto want_dyp = download(s0.dyp.p, used_rows_bytes);
  for (const auto& c : kCandidates) {
    Set& s1 = *sets[1];
    if (std::string(c.op) == "permute") {
      BENCH_CUDA(cudaMemsetAsync(s1.xp.p, 0xa5, rows_bytes, stream));
      BENCH_CUDA(c.launch(args_for(c, s1), stream));
    } else {
      BENCH_CUDA(cudaMemcpyAsync(s1.xp.p, s0.xp.p, rows_bytes, cudaMemcpyDeviceToDevice, stream));
      BENCH_CUDA(cudaMemsetAsync(s1.dyp.p, 0xa5, rows_bytes, stream));
      BENCH_CUDA(c.launch(args_for(c, s1), stream));
    }
    BENCH_CUDA(cudaStreamSynchronize(stream));
    const bool permute = std::string(c.op) == "permute";
    if (download(permute ? s1.xp.p : s1.dyp.p, used_rows_bytes) != (permute ? want_xp : want_dyp)) {
      std::fprintf(stderr, "validation failed: %s %s (%s) differs from the library's rows\n", shape.name, c.op, c.name);
      std::exit(2);
    }
  }
  for (int c = 2; c < copies; ++c)  // yp for combine backward in every set
    BENCH_CUDA(cudaMemcpy(sets[c]->xp.p, s0.xp.p, rows_bytes, cudaMemcpyDeviceToDevice));
  BENCH_CUDA(cudaMemcpy(sets[1]->xp.p, s0.xp.p, rows_bytes, cudaMemcpyDeviceToDevice));

  // Time.
  const double row_bytes = static_cast<double>(H) * es;
  const double permute_read = T_ * row_bytes + T_ * K * 8.0;
  const double permute_write = total * row_bytes + total * 4.0;
  const double cb_read = T_ * row_bytes + total * row_bytes + T_ * K * 8.0;
  const double cb_write = total * row_bytes + T_ * K * 4.0;
  Json ops = Json::array();
  for (const auto& c : kCandidates) {
    const bool permute = std::string(c.op) == "permute";
    const double rd = permute ? permute_read : cb_read, wr = permute ? permute_write : cb_write;
    int call = 0;
    const auto t = moekit::bench::time_us(stream, warmup, repeats, [&](int) {
      Set& s = *sets[call++ % copies];
      BENCH_CUDA(c.launch(args_for(c, s), stream));
    });
    BENCH_CUDA(cudaGetLastError());
    const double gbps = (rd + wr) / (t.median_us * 1e-6) / 1e9;
    const double of_copy = (rd + wr) / copy_bw / (t.median_us * 1e-6);
    // Reads at the copy bandwidth and writes at the memset bandwidth: a lower bound that
    // credits writes with what the device can do when it only writes.
    const double mixed_floor_us = (rd / copy_bw + wr / write_bw) * 1e6;
    char line[256];
    std::snprintf(line, sizeof(line), "%-9s %-17s %-34s %9.1f %8.1f %7.1f%% %8.1f%%%s", shape.name, c.op, c.name,
                  t.median_us, gbps, 100.0 * of_copy, 100.0 * mixed_floor_us / t.median_us,
                  is_default(c) ? "  <- tuning.hpp" : "");
    table.push_back(line);
    ops.push(Json::object()
                 .set("op", c.op)
                 .set("candidate", c.name)
                 .set("scatter_unroll", c.scatter_unroll)
                 .set("streaming_stores", c.streaming)
                 .set("library_default", is_default(c))
                 .set("median_us", t.median_us)
                 .set("min_us", t.min_us)
                 .set("max_us", t.max_us)
                 .set("bytes_read", rd)
                 .set("bytes_written", wr)
                 .set("gbps", gbps)
                 .set("fraction_of_copy_floor", of_copy)
                 .set("fraction_of_mixed_floor", mixed_floor_us / t.median_us));
  }
  shapes_json.push(Json::object()
                       .set("name", shape.name)
                       .set("tokens", T_)
                       .set("hidden", H)
                       .set("top_k", K)
                       .set("experts", E)
                       .set("dtype", "bf16")
                       .set("total_rows", static_cast<int64_t>(total))
                       .set("rotated_copies", copies)
                       .set("ops", ops));
}

}  // namespace

int main(int argc, char** argv) {
  moekit::bench::Args args(argc, argv);
  if (args.has("help")) {
    std::printf("moekit-tune-tokens [--preset=deepseek|wide|mixtral|all] [--warmup=10 --repeats=50 --seed=1234] "
                "[--json=path]\n");
    return 0;
  }
  const std::vector<Shape> presets = {{"deepseek", 4096, 7168, 8, 256},
                                      {"wide", 16384, 2048, 8, 128},
                                      {"mixtral", 8192, 4096, 2, 8}};
  const std::string preset = args.get("preset", "all");
  std::vector<Shape> shapes;
  for (const auto& p : presets)
    if (preset == "all" || preset == p.name) shapes.push_back(p);
  if (shapes.empty()) {
    std::fprintf(stderr, "unknown --preset=%s\n", preset.c_str());
    return 2;
  }
  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreate(&stream));
  const double copy_bw = moekit::bench::measure_copy_bandwidth(stream);
  const double write_bw = moekit::bench::measure_write_bandwidth(stream);
  std::printf("device: %s, copy bandwidth %.0f GB/s (read + write), write bandwidth %.0f GB/s (memset), commit %s\n",
              moekit::bench::device_description().c_str(), copy_bw / 1e9, write_bw / 1e9,
              moekit::bench::build_commit().c_str());
  Json shapes_json = Json::array();
  std::vector<std::string> table;
  for (const auto& s : shapes) run_shape(s, args, copy_bw, write_bw, stream, shapes_json, table);
  std::printf("\n%-9s %-17s %-34s %9s %8s %8s %9s\n", "shape", "op", "candidate", "median_us", "GB/s", "of copy",
              "of mixed");
  for (const auto& line : table) std::printf("%s\n", line.c_str());
  std::printf("(of mixed: against reads at the copy bandwidth plus writes at the memset bandwidth)\n");
  if (args.has("json")) {
    Json root = Json::object()
                    .set("benchmark", "moekit-tune-tokens")
                    .set("device", moekit::bench::device_description())
                    .set("commit", moekit::bench::build_commit())
                    .set("date", moekit::bench::utc_now())
                    .set("copy_bandwidth_gbps", copy_bw / 1e9)
                    .set("write_bandwidth_gbps", write_bw / 1e9)
                    .set("shapes", shapes_json);
    if (!moekit::bench::write_file(args.get("json", ""), root.dump())) {
      std::fprintf(stderr, "cannot write %s\n", args.get("json", "").c_str());
      return 1;
    }
    std::printf("wrote %s\n", args.get("json", "").c_str());
  }
  cudaStreamDestroy(stream);
  return 0;
}
