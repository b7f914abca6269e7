// The benchmark that chose the Hopper path's tile per shape class (sm90::choose_tile,
// docs/experts.md "Tile per shape class"): every axis-M GEMM that takes a tile configuration,
// timed on each of them (sm90::Tile: 128 x 256, 64 x 256, and for the forward kinds 128 x 256 in
// clusters of two with B multicast), in one binary, interleaved rounds (bench_util's time_us_interleaved: each round runs
// every tile once, the order rotated), over the three presets' shapes at several rows per expert,
// balanced, skewed (the experts benchmark's counts, proportional to u^3) and random (every row
// routed to a uniformly random expert: multinomial counts, as a router's top-k spreads a small
// batch). The kernels are those of the tests'
// sm_90a launch library (tests/experts/experts_sm90_tiles_launch.cu), bf16, which the tile test
// checks bit for bit against each other.
//   moekit-bench-sm90-tiles [--preset=dsv3-ep8|qwen3-30b|mixtral|all]
//                           [--rows-per-expert=64,128,192,256,512,1024,2048]
//                           [--dist=balanced,skewed,random]
//                           [--kernels=fwd-gu-h,fwd-gu-hu,fwd-down,dx,act] [--warmup=2] [--repeats=8]
//                           [--tail=off|both] [--stream=legacy|created]
//                           [--json=bench/results/sm90-tiles-h200.json]
// --tail=both also times the 128- and 64-row tiles with the stream-K tail (132 partial slots;
// grouped_problem.cuh StreamKTail), "128+tail" and "64+tail", in the same rounds; --stream=created
// runs everything on a created stream, where the tail launch is a programmatic dependent.
// Kernels: fwd-gu-h / fwd-gu-hu, u = x W_gu (B KN, SwiGLU, concatenated gate/up), h = act(u) p
// (h alone / h and the saved u); fwd-down, y = h W_down (B KN, weights after down); dx = du W_gu^T
// (B NK, kEpiStore); act, the activation-backward dgrad G = dy W_down^T with du and h' (B NK,
// staged). FLOPs counted are the useful ones, 2 R N K.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bench/common/bench_util.hpp"
#include "kernels/experts/grouped_gemm_sm90.hpp"
#include "tests/experts/experts_sm90_support.hpp"
#include "tests/experts/experts_sm90_tiles_launch.hpp"
#include "tests/support/numeric.hpp"

namespace {

namespace mb = moekit::bench;
namespace kx = moekit::kernels::experts;
namespace k90 = moekit::kernels::experts::sm90;

struct Shape {
  const char* name;
  int e, h, i;
};

bool listed(const std::vector<std::string>& list, const std::string& name) {
  return list.empty() || std::find(list.begin(), list.end(), name) != list.end();
}

// `buf` filled with copies of `block` (bf16 values uniform in [-1, 1)): tensor cores draw
// data-dependent power, so constant inputs would time a cooler GPU.
mb::DeviceBuffer random_buffer(size_t bytes, const std::vector<uint16_t>& block) {
  mb::DeviceBuffer buf(bytes);
  const size_t chunk = block.size() * sizeof(uint16_t);
  for (size_t off = 0; off < bytes; off += chunk)
    BENCH_CUDA(cudaMemcpy(buf.at(off), block.data(), std::min(chunk, bytes - off), cudaMemcpyHostToDevice));
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  const mb::Args args(argc, argv);
  if (args.has("help")) {
    std::printf(
        "moekit-bench-sm90-tiles [--preset=dsv3-ep8|qwen3-30b|mixtral|all] [--rows-per-expert=64,128,...] "
        "[--dist=balanced,skewed,random] [--kernels=fwd-gu-h,fwd-gu-hu,fwd-down,dx,act] [--warmup=2] [--repeats=8] "
        "[--tail=off|both] [--stream=legacy|created] [--json=path]\n");
    return 0;
  }
  const std::string preset = args.get("preset", "all");
  std::vector<int64_t> rpes;
  for (const std::string& v : args.get_list("rows-per-expert", "64,128,192,256,512,1024,2048"))
    rpes.push_back(std::stoll(v));
  const std::vector<std::string> dists = args.get_list("dist", "balanced,skewed,random");
  const std::vector<std::string> kernels = args.get_list("kernels", "");
  const int warmup = static_cast<int>(args.get_int("warmup", 2));
  const int repeats = static_cast<int>(args.get_int("repeats", 8));
  const std::string json = args.get("json", "");
  const bool with_tail = args.get("tail", "off") == "both";
  cudaStream_t stream = nullptr;
  if (args.get("stream", "legacy") == "created") BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // The stream-K tail's workspace (flags zeroed once: every launch leaves them zero).
  mb::DeviceBuffer sk_partials(with_tail ? static_cast<size_t>(kx::kStreamKSlots) * kx::kStreamKSlotFloats * 4 : 0);
  mb::DeviceBuffer sk_flags(with_tail ? static_cast<size_t>(kx::kStreamKSlots) * kx::kStreamKSlotFlags * 4 : 0);
  if (with_tail) BENCH_CUDA(cudaMemset(sk_flags.p, 0, static_cast<size_t>(kx::kStreamKSlots) * kx::kStreamKSlotFlags * 4));
  const std::vector<Shape> presets = {{"dsv3-ep8", 32, 7168, 2048}, {"qwen3-30b", 128, 2048, 768},
                                      {"mixtral", 8, 4096, 14336}};

  moekit::test::sm90::require_sm90("moekit-bench-sm90-tiles: the sm_90a kernels");
  std::vector<uint16_t> block(8u << 20);
  std::mt19937_64 rng(1234);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  for (uint16_t& b : block) b = moekit::test::float_to_bf16_bits(uni(rng));

  mb::Json results = mb::Json::array();
  std::printf("%-10s %5s %-8s %-10s %9s %9s %9s %7s %7s %8s  %s\n", "shape", "r/e", "dist", "kernel", "128 us",
              "64 us", "128x2 us", "64/128", "x2/128", "128 TF", "best");
  for (const Shape& s : presets) {
    if (preset != "all" && preset != s.name) continue;
    const int E = s.e, H = s.h, I = s.i;
    const int64_t R_max = *std::max_element(rpes.begin(), rpes.end()) * E;
    const size_t eb = 2;
    const mb::DeviceBuffer x = random_buffer(R_max * H * eb, block), hbuf = random_buffer(R_max * I * eb, block);
    const mb::DeviceBuffer du = random_buffer(R_max * 2 * I * eb, block), dy = random_buffer(R_max * H * eb, block);
    const mb::DeviceBuffer u_saved = random_buffer(R_max * 2 * I * eb, block);
    const mb::DeviceBuffer wgu = random_buffer(static_cast<size_t>(E) * H * 2 * I * eb, block);
    const mb::DeviceBuffer wd = random_buffer(static_cast<size_t>(E) * I * H * eb, block);
    const mb::DeviceBuffer out_a = random_buffer(R_max * 2 * I * eb, block);
    const mb::DeviceBuffer out_b = random_buffer(R_max * std::max(H, 2 * I) * eb, block);
    const mb::DeviceBuffer hp = random_buffer(R_max * I * eb, block);
    const mb::DeviceBuffer pw = random_buffer(R_max * 4, std::vector<uint16_t>(1u << 20, 0x3f80));  // p = ~1.0
    mb::DeviceBuffer offsets((E + 1) * sizeof(int32_t));
    const int32_t* d_off = offsets.as<int32_t>();
    for (int64_t rpe : rpes)
      for (const std::string& dist : dists) {
        const int64_t R = rpe * E;
        std::vector<int64_t> counts;
        if (dist == "random") {
          counts.assign(E, 0);
          std::mt19937_64 route(4321 + static_cast<uint64_t>(R));
          std::uniform_int_distribution<int> expert(0, E - 1);
          for (int64_t r = 0; r < R; ++r) ++counts[expert(route)];
        } else {
          counts = mb::expert_counts(E, R, dist == "skewed", 1234);
        }
        std::vector<int32_t> off(E + 1, 0);
        for (int g = 0; g < E; ++g) off[g + 1] = off[g] + static_cast<int32_t>(counts[g]);
        offsets.upload(off);
        struct Run {
          const char* kernel;
          kx::EpiKind kind;
          kx::GroupedGemmProblem p;
          kx::EpilogueParams ep;
        };
        auto axis_m = [&](const char* kernel, kx::EpiKind kind, int n, int k, const void* a, const void* b,
                          bool b_nk) {
          Run r{kernel, kind, moekit::test::sm90::axis_m_problem(E, d_off, R, n, k, a, b, b_nk), {}};
          r.ep.row_weights = static_cast<const float*>(pw.p);
          return r;
        };
        std::vector<Run> runs;
        for (int with_u = 0; with_u < 2; ++with_u) {
          Run r = axis_m(with_u ? "fwd-gu-hu" : "fwd-gu-h", kx::kEpiGateUp, 2 * I, H, x.p, wgu.p, false);
          r.p.gate_up_half = I;
          r.ep.c = hbuf.p;
          r.ep.ldc = I;
          r.ep.u = with_u ? out_a.p : nullptr;
          r.ep.ldu = 2 * I;
          r.ep.act = kx::ActParams{kx::kActSwiglu, 1.702f, 0.0f};
          r.ep.inter = I;
          runs.push_back(r);
        }
        {
          Run r = axis_m("fwd-down", kx::kEpiStore, H, I, hbuf.p, wd.p, false);
          r.ep.c = out_b.p;
          r.ep.ldc = H;
          r.ep.weight_after_down = 1;
          runs.push_back(r);
        }
        {
          Run r = axis_m("dx", kx::kEpiStore, H, 2 * I, du.p, wgu.p, true);  // W_gu [E][H][2I] as [N = H][K = 2I]
          r.ep.c = out_b.p;
          r.ep.ldc = H;
          r.ep.row_weights = nullptr;
          runs.push_back(r);
        }
        {
          Run r = axis_m("act", kx::kEpiBwdAct, I, H, dy.p, wd.p, true);  // W_down [E][I][H] as [N = I][K = H]
          r.ep.u = u_saved.p;
          r.ep.ldu = 2 * I;
          r.ep.c = out_a.p;  // du
          r.ep.ldc = 2 * I;
          r.ep.h = hp.p;  // h'
          r.ep.ldh = I;
          r.ep.inter = I;
          r.ep.act = kx::ActParams{kx::kActSwiglu, 1.702f, 0.0f};
          r.ep.dp_partial = static_cast<float*>(out_b.p);
          r.ep.ld_dp = (I + k90::TileConfig::kBN - 1) / k90::TileConfig::kBN;
          runs.push_back(r);
        }
        for (const Run& r : runs) {
          if (!listed(kernels, r.kernel)) continue;
          struct Variant {
            k90::Tile tile;
            bool tail;
            std::string name;
            kx::GroupedGemmProblem p;
          };
          std::vector<Variant> variants;
          for (int t = 0; t < k90::kTileCount; ++t) {
            const k90::Tile tile = static_cast<k90::Tile>(t);
            if (!k90::tile_takes(tile, r.p)) continue;
            for (int tail = 0; tail < (with_tail && tile != k90::Tile::k128x2 ? 2 : 1); ++tail) {
              Variant v{tile, tail != 0, std::string(k90::tile_name(tile)) + (tail ? "+tail" : ""), r.p};
              if (v.tail) {
                v.p.sk_partials = static_cast<float*>(sk_partials.p);
                v.p.sk_flags = static_cast<int*>(sk_flags.p);
                v.p.sk_slots = kx::kStreamKSlots;
              }
              const cudaError_t e = moekit::test::sm90_tiles::launch(tile, v.p, r.kind, r.ep, stream);
              BENCH_CUDA(cudaDeviceSynchronize());
              if (e != cudaSuccess) {
                std::printf("%-10s %5lld %-8s %-10s %s: %s\n", s.name, static_cast<long long>(rpe),
                            dist.c_str(), r.kernel, v.name.c_str(), cudaGetErrorString(e));
                continue;
              }
              variants.push_back(v);
            }
          }
          if (variants.empty()) continue;
          std::vector<std::function<void(int)>> fns;
          for (const Variant& v : variants)
            fns.push_back([&r, &v, stream](int) {
              BENCH_CUDA(moekit::test::sm90_tiles::launch(v.tile, v.p, r.kind, r.ep, stream));
            });
          const std::vector<mb::Timing> tm = mb::time_us_interleaved(stream, warmup, repeats, fns);
          double us[k90::kTileCount] = {0, 0, 0}, tail_us[k90::kTileCount] = {0, 0, 0};
          for (size_t v = 0; v < variants.size(); ++v)
            (variants[v].tail ? tail_us : us)[static_cast<int>(variants[v].tile)] = tm[v].median_us;
          int best = -1;
          for (const Variant& v : variants)
            if (!v.tail && (best < 0 || us[static_cast<int>(v.tile)] < us[best])) best = static_cast<int>(v.tile);
          const double flops = 2.0 * static_cast<double>(R) * r.p.n * r.p.k;
          auto ratio = [&](int t) { return us[0] > 0 && us[t] > 0 ? us[t] / us[0] : 0.0; };
          auto tflops = [&](int t) { return us[t] > 0 ? flops / us[t] * 1e-6 : 0.0; };
          std::printf("%-10s %5lld %-8s %-10s %9.1f %9.1f %9.1f %7.3f %7.3f %8.1f  %s\n", s.name,
                      static_cast<long long>(rpe), dist.c_str(), r.kernel, us[0], us[1], us[2], ratio(1), ratio(2),
                      tflops(0), k90::tile_name(static_cast<k90::Tile>(best)));
          if (with_tail)
            std::printf("%-10s %5lld %-8s %-10s   +tail: 128 %9.1f us (x %.4f), 64 %9.1f us (x %.4f)\n", s.name,
                        static_cast<long long>(rpe), dist.c_str(), r.kernel, tail_us[0],
                        us[0] > 0 ? tail_us[0] / us[0] : 0.0, tail_us[1], us[1] > 0 ? tail_us[1] / us[1] : 0.0);
          mb::Json row = mb::Json::object();
          row.set("shape", s.name).set("experts", E).set("hidden", H).set("inter", I);
          row.set("rows_per_expert", rpe).set("rows", R).set("dist", dist);
          row.set("kernel", r.kernel).set("n", r.p.n).set("k", r.p.k);
          mb::Json per = mb::Json::object();
          for (size_t v = 0; v < variants.size(); ++v) {
            const double plain = us[static_cast<int>(variants[v].tile)];
            per.set(variants[v].name, mb::Json::object()
                                          .set("median_us", tm[v].median_us)
                                          .set("min_us", tm[v].min_us)
                                          .set("max_us", tm[v].max_us)
                                          .set("tflops", flops / tm[v].median_us * 1e-6)
                                          .set("time_over_128x256", us[0] > 0 ? tm[v].median_us / us[0] : 0.0)
                                          .set("time_over_untailed", plain > 0 ? tm[v].median_us / plain : 0.0));
          }
          row.set("tiles", per).set("best", k90::tile_name(static_cast<k90::Tile>(best)));
          results.push(row);
        }
      }
  }
  if (!json.empty()) {
    mb::Json doc = mb::Json::object();
    doc.set("benchmark", "moekit-bench-sm90-tiles").set("device", mb::device_description());
    doc.set("commit", mb::build_commit()).set("date", mb::utc_now()).set("dtype", "bf16");
    doc.set("warmup", warmup).set("repeats", repeats).set("stream", stream ? "created" : "legacy");
    doc.set("results", results);
    if (!mb::write_file(json, doc.dump(2))) return 1;
  }
  return 0;
}
