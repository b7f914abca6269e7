// The TMA-store epilogue of the Hopper grouped GEMM (MOEKIT_SM90_TMA_STORE; grouped_gemm_sm90.cuh
// tma_store_tile) against the register-direct stores it replaces, bit for bit, in one binary:
// experts_sm90_epilogue_launch.cu instantiates the sm_90a kernels for this test (built only when
// gpu_archs contains 90) and its launchers run either epilogue on the same inputs, whatever the
// library's default. Cases: axis M kEpiStore with B KN (the forward down
// projection) and B NK (its dgrad), plain and with bias / routing weights (weight_after_down on
// and off); groups that straddle row tiles, empty groups, groups shorter than one warpgroup,
// trailing rows owned by no group, column tails (N not a multiple of 64 or 256), padded rows
// (ldc > N), many tiles per CTA, the 3-stage ring (E = 600); the weight gradient (kEpiWgrad,
// splits = 1) with m and n tails, k tails and empty groups; the forward gate-up epilogue
// (MOEKIT_SM90_TMA_STORE_GATE_UP: kEpiGateUp concatenated and interleaved, kEpiRelu2; h alone and
// h with u; every activation kind, with and without the clamp) on the same kinds of groups, where
// group tails are copied out of the staging region by thread. Both dtypes. Every output byte is
// compared (poisoned first: rows of no group and padding must stay untouched by both), every
// element a group owns must have been written, and the TMA path must repeat its bits.
// Exits 77 (SKIP) without a compute capability 9.0 device.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/experts/grouped_gemm_sm90.hpp"
#include "tests/experts/experts_sm90_epilogue_launch.hpp"
#include "tests/experts/experts_sm90_support.hpp"
#include "tests/support/catch.hpp"
#include "tests/support/device.hpp"
#include "tests/support/numeric.hpp"
#include "tests/support/random.hpp"


namespace {

using moekit::test::DeviceBuffer;
namespace kx = moekit::kernels::experts;
namespace k90 = moekit::kernels::experts::sm90;
namespace shim = moekit::test::sm90_epilogue;

constexpr int kPoison = 0xff;  // 0xffff: a NaN in bf16 and f16, never a finite result

void require_sm90() { moekit::test::sm90::require_sm90("the sm_90a epilogue tests"); }

// 16-bit elements as raw bits: bf16 (kBf16) or f16.
float bits_to_float(bool bf16, uint16_t b) {
  return bf16 ? moekit::test::bf16_bits_to_float(b) : moekit::test::half_bits_to_float(b);
}

DeviceBuffer random_device(bool bf16, std::mt19937_64& rng, size_t n, float lo, float hi) {
  const std::vector<float> f = moekit::test::uniform(rng, n, lo, hi);
  std::vector<uint16_t> h(n);
  for (size_t i = 0; i < n; ++i)
    h[i] = bf16 ? moekit::test::float_to_bf16_bits(f[i]) : moekit::test::float_to_half_bits(f[i]);
  return DeviceBuffer::from(h);
}

std::vector<int32_t> offsets_of(const std::vector<int>& sizes) {
  std::vector<int32_t> off(1, 0);
  for (int s : sizes) off.push_back(off.back() + s);
  return off;
}

// Rows [off[g], off[g + 1]) of every group, columns [0, n) of each row of ld elements: written
// (not the poison pattern, i.e. not NaN) in `out`.
void require_written(bool bf16, const std::vector<uint16_t>& out, const std::vector<int32_t>& off, int n,
                     int64_t ld) {
  int64_t unwritten = 0;
  for (size_t g = 0; g + 1 < off.size(); ++g)
    for (int64_t r = off[g]; r < off[g + 1]; ++r)
      for (int c = 0; c < n; ++c)
        unwritten += std::isnan(bits_to_float(bf16, out[static_cast<size_t>(r * ld + c)])) ? 1 : 0;
  REQUIRE(unwritten == 0);
}

struct StoreCase {
  const char* name;
  std::vector<int> sizes;  // rows per group (0: empty expert)
  int trailing;            // rows after the last group (owned by none)
  int n, k;
  int ldc_pad;             // ldc = n + ldc_pad
  bool bias, weights, weight_after_down;
};

// axis M, kEpiStore: B KN (b_nk = false, forward down) or NK (b_nk = true, dgrad).
void run_store_case(bool bf16, bool b_nk, const StoreCase& sc, uint64_t salt) {
  INFO("case " << sc.name << (b_nk ? " (B NK)" : " (B KN)") << (bf16 ? " bf16" : " f16"));
  auto rng = moekit::test::make_rng(salt);
  const int G = static_cast<int>(sc.sizes.size());
  const std::vector<int32_t> off = offsets_of(sc.sizes);
  const int64_t R = off.back() + sc.trailing;
  const int64_t ldc = sc.n + sc.ldc_pad;
  DeviceBuffer offsets = DeviceBuffer::from(off);
  DeviceBuffer a = random_device(bf16, rng, static_cast<size_t>(R * sc.k), -1.0f, 1.0f);
  DeviceBuffer b = random_device(bf16, rng, static_cast<size_t>(G) * sc.k * sc.n, -1.0f, 1.0f);
  DeviceBuffer bias = random_device(bf16, rng, static_cast<size_t>(G) * sc.n, -0.5f, 0.5f);
  const std::vector<float> pw = moekit::test::uniform(rng, static_cast<size_t>(R), 0.0f, 1.0f);
  DeviceBuffer weights = DeviceBuffer::from(pw);
  DeviceBuffer out0(static_cast<size_t>(R * ldc) * sizeof(uint16_t)), out1(out0.bytes()), out2(out0.bytes());

  const kx::GroupedGemmProblem p =
      moekit::test::sm90::axis_m_problem(G, offsets.get<int32_t>(), R, sc.n, sc.k, a.get(), b.get(), b_nk);
  REQUIRE(k90::takes(p, kx::kEpiStore));

  kx::EpilogueParams ep{};
  ep.ldc = ldc;
  ep.bias = sc.bias ? bias.get() : nullptr;
  ep.bias_group_stride = sc.n;
  ep.row_weights = sc.weights ? weights.get<float>() : nullptr;
  ep.weight_after_down = sc.weight_after_down ? 1 : 0;

  DeviceBuffer* outs[3] = {&out0, &out1, &out2};
  const bool tma[3] = {false, true, true};
  for (int i = 0; i < 3; ++i) {
    outs[i]->poison(kPoison);
    ep.c = outs[i]->get();
    if (tma[i]) REQUIRE(k90::tma_store_takes(p, kx::kEpiStore, ep));
    REQUIRE(shim::launch_store(bf16, p, ep, tma[i]) == cudaSuccess);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  }
  const std::vector<uint16_t> h0 = out0.to_host<uint16_t>(), h1 = out1.to_host<uint16_t>(),
                              h2 = out2.to_host<uint16_t>();
  require_written(bf16, h0, off, sc.n, ldc);
  // Rows of no group and the padding columns [n, ldc) still hold the poison in the TMA output.
  REQUIRE(moekit::test::sm90::check_poison(h1, R, off.back(), sc.n, ldc).touched == 0);
  REQUIRE(std::memcmp(h0.data(), h1.data(), h0.size() * sizeof(uint16_t)) == 0);  // TMA store == register-direct
  REQUIRE(std::memcmp(h1.data(), h2.data(), h1.size() * sizeof(uint16_t)) == 0);  // and repeats its bits
}

const std::vector<StoreCase>& store_cases() {
  static const std::vector<StoreCase> cases = [] {
    std::vector<StoreCase> v;
    // Straddling tiles, empty experts, groups shorter than a warpgroup (63, 1), exactly one
    // warpgroup (64) or tile (128), one row past (65, 129), trailing rows, column tail 328 = 256
    // + 72 (tile 1: boxes at 256 and 320, the latter 8 columns wide; 384, 448 not issued), ldc > N.
    v.push_back({"straddle", {300, 0, 1, 63, 64, 65, 0, 127, 128, 129, 700, 0}, 5, 328, 192, 8, false, false, false});
    v.push_back({"bias+weights after down", {300, 0, 1, 63, 64, 65, 0, 127, 128, 129, 700, 0}, 5, 328, 192, 8, true,
                 true, true});
    v.push_back({"bias+weights before down", {257, 0, 191, 192, 193, 0, 640}, 3, 200, 64, 0, true, true, false});
    // Many tiles per CTA: ~96 row tiles x 5 column tiles (1032 = 4 x 256 + 8) on 132 SMs.
    {
      StoreCase c{"many tiles per CTA", {}, 0, 1032, 128, 0, true, true, true};
      for (int g = 0; g < 24; ++g) c.sizes.push_back(g % 5 == 3 ? 0 : 384 + 37 * g);
      v.push_back(c);
    }
    // E = 600 > 483: the 3-stage TMA-store instance (most experts empty, a few long ones).
    {
      StoreCase c{"3-stage ring, E = 600", {}, 7, 264, 128, 8, true, true, false};
      for (int g = 0; g < 600; ++g) c.sizes.push_back(g % 97 == 0 ? 150 + g : (g % 13 == 0 ? 64 : 0));
      v.push_back(c);
    }
    return v;
  }();
  return cases;
}

TEST_CASE("sm90 TMA-store epilogue: kEpiStore, B KN (forward down), bit for bit", "[gpu][sm90][epilogue]") {
  require_sm90();
  uint64_t salt = 0x5101;
  for (const StoreCase& c : store_cases()) {
    run_store_case(true, false, c, salt++);
    run_store_case(false, false, c, salt++);
  }
}

TEST_CASE("sm90 TMA-store epilogue: kEpiStore, B NK (dgrad), bit for bit", "[gpu][sm90][epilogue]") {
  require_sm90();
  uint64_t salt = 0x5201;
  for (const StoreCase& c : store_cases()) {
    run_store_case(true, true, c, salt++);
    run_store_case(false, true, c, salt++);
  }
}

TEST_CASE("sm90 TMA-store epilogue: the ring depth follows the groups", "[gpu][sm90][epilogue]") {
  require_sm90();
  int optin = 0;
  REQUIRE(shim::smem_optin(&optin) == cudaSuccess);
  REQUIRE(k90::tma_store_stages(0, static_cast<size_t>(optin)) == 4);
  REQUIRE(k90::tma_store_stages(128, static_cast<size_t>(optin)) == 4);
  REQUIRE(k90::tma_store_stages(600, static_cast<size_t>(optin)) == 3);
}

// ---- The forward gate-up epilogue (kEpiGateUp / kEpiRelu2) ----
enum class GuLayout { kConcat, kInterleaved, kRelu2 };

const char* layout_name(GuLayout l) {
  return l == GuLayout::kConcat ? "concatenated" : (l == GuLayout::kInterleaved ? "interleaved" : "relu2");
}

struct GateUpCase {
  const char* name;
  std::vector<int> sizes;  // rows per group (0: empty expert)
  int trailing;            // rows after the last group (owned by none)
  int inter, k;            // I (h columns; relu2: also u's), K
  int ldc_pad, ldu_pad;    // ldc = I + ldc_pad, ldu = N + ldu_pad
  bool bias, weights, weight_after_down;
};


void run_gate_up_case(bool bf16, GuLayout layout, bool with_u, const kx::ActParams& act, const GateUpCase& gc,
                      uint64_t salt) {
  INFO("gate-up case " << gc.name << ", " << layout_name(layout) << (with_u ? ", h and u" : ", h only") << ", act "
                       << act.kind << " alpha " << act.alpha << " limit " << act.limit << (bf16 ? " bf16" : " f16"));
  auto rng = moekit::test::make_rng(salt);
  const int G = static_cast<int>(gc.sizes.size());
  const std::vector<int32_t> off = offsets_of(gc.sizes);
  const int64_t R = off.back() + gc.trailing;
  const int I = gc.inter;
  const int N = layout == GuLayout::kRelu2 ? I : 2 * I;
  const int64_t ldc = I + gc.ldc_pad, ldu = N + gc.ldu_pad;
  const kx::EpiKind kind = layout == GuLayout::kRelu2 ? kx::kEpiRelu2 : kx::kEpiGateUp;
  DeviceBuffer offsets = DeviceBuffer::from(off);
  DeviceBuffer a = random_device(bf16, rng, static_cast<size_t>(R * gc.k), -1.0f, 1.0f);
  DeviceBuffer b = random_device(bf16, rng, static_cast<size_t>(G) * gc.k * N, -0.5f, 0.5f);
  DeviceBuffer bias = random_device(bf16, rng, static_cast<size_t>(G) * N, -0.5f, 0.5f);
  const std::vector<float> pw = moekit::test::uniform(rng, static_cast<size_t>(R), 0.0f, 1.0f);
  DeviceBuffer weights = DeviceBuffer::from(pw);
  DeviceBuffer h[3] = {DeviceBuffer(static_cast<size_t>(R * ldc) * sizeof(uint16_t)),
                       DeviceBuffer(static_cast<size_t>(R * ldc) * sizeof(uint16_t)),
                       DeviceBuffer(static_cast<size_t>(R * ldc) * sizeof(uint16_t))};
  DeviceBuffer u[3] = {DeviceBuffer(static_cast<size_t>(R * ldu) * sizeof(uint16_t)),
                       DeviceBuffer(static_cast<size_t>(R * ldu) * sizeof(uint16_t)),
                       DeviceBuffer(static_cast<size_t>(R * ldu) * sizeof(uint16_t))};

  kx::GroupedGemmProblem p{};
  p.axis = kx::kAxisM;
  p.num_groups = G;
  p.offsets = offsets.get<int32_t>();
  p.max_rows = R;
  p.n = N;
  p.k = gc.k;
  p.a = a.get();
  p.lda = gc.k;
  p.b = b.get();
  p.ldb = N;
  p.b_group_stride = static_cast<int64_t>(gc.k) * N;
  p.b_nk = 0;
  p.gate_up_half = layout == GuLayout::kConcat ? I : 0;
  p.splits = 1;
  REQUIRE(k90::takes(p, kind));

  kx::EpilogueParams ep{};
  ep.ldc = ldc;
  ep.ldu = ldu;
  ep.bias = gc.bias ? bias.get() : nullptr;
  ep.bias_group_stride = N;
  ep.row_weights = gc.weights ? weights.get<float>() : nullptr;
  ep.weight_after_down = gc.weight_after_down ? 1 : 0;
  ep.act = act;
  ep.interleaved = layout == GuLayout::kInterleaved ? 1 : 0;
  ep.inter = I;

  const bool tma[3] = {false, true, true};
  for (int i = 0; i < 3; ++i) {
    h[i].poison(kPoison);
    u[i].poison(kPoison);
    ep.c = h[i].get();
    ep.u = with_u ? u[i].get() : nullptr;
    if (tma[i]) REQUIRE(k90::tma_store_gate_up_takes(p, kind, ep));
    REQUIRE(shim::launch_gate_up(bf16, p, kind, ep, tma[i]) == cudaSuccess);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  }
  std::vector<uint16_t> hh[3], uh[3];
  for (int i = 0; i < 3; ++i) {
    hh[i] = h[i].to_host<uint16_t>();
    uh[i] = u[i].to_host<uint16_t>();
  }
  require_written(bf16, hh[0], off, I, ldc);
  REQUIRE(moekit::test::sm90::check_poison(hh[1], R, off.back(), I, ldc).touched == 0);
  REQUIRE(std::memcmp(hh[0].data(), hh[1].data(), hh[0].size() * sizeof(uint16_t)) == 0);  // TMA == register-direct
  REQUIRE(std::memcmp(hh[1].data(), hh[2].data(), hh[1].size() * sizeof(uint16_t)) == 0);  // and repeats its bits
  if (with_u) {
    require_written(bf16, uh[0], off, N, ldu);
    REQUIRE(moekit::test::sm90::check_poison(uh[1], R, off.back(), N, ldu).touched == 0);
    REQUIRE(std::memcmp(uh[0].data(), uh[1].data(), uh[0].size() * sizeof(uint16_t)) == 0);
    REQUIRE(std::memcmp(uh[1].data(), uh[2].data(), uh[1].size() * sizeof(uint16_t)) == 0);
  } else {
    for (int i = 0; i < 3; ++i) REQUIRE(moekit::test::still_poisoned(u[i], kPoison));  // no u asked, none written
  }
}

const std::vector<GateUpCase>& gate_up_cases() {
  static const std::vector<GateUpCase> cases = [] {
    std::vector<GateUpCase> v;
    // Straddling tiles, empty experts, groups shorter than a warpgroup (1, 63: tail copies), one
    // warpgroup (64), one tile (128), one row past (65, 129), trailing rows; I = 200: the second
    // column tile's h boxes at 128 (full) and 192 (8 columns), relu2's second half at 128.
    v.push_back({"straddle", {300, 0, 1, 63, 64, 65, 0, 127, 128, 129, 700, 0}, 5, 200, 192, 8, 8, false, false, false});
    v.push_back({"bias+weights before down", {257, 0, 191, 192, 193, 0, 640}, 3, 264, 64, 0, 16, true, true, false});
    v.push_back({"bias+weights after down", {300, 0, 1, 63, 64, 65, 0, 127, 128, 129, 700, 0}, 5, 200, 128, 8, 0, true,
                 true, true});
    // I = 120: one column tile; relu2's second phase (columns 128..) lies past N and is skipped,
    // the concatenated h's second box starts at 64 and clips at 120.
    v.push_back({"narrow", {65, 0, 200, 7}, 2, 120, 64, 0, 8, true, true, false});
    // Many tiles per CTA: ~96 row tiles x 9 column tiles (2 I = 2064) on 132 SMs.
    {
      GateUpCase c{"many tiles per CTA", {}, 0, 1032, 128, 0, 0, true, true, false};
      for (int g = 0; g < 24; ++g) c.sizes.push_back(g % 5 == 3 ? 0 : 384 + 37 * g);
      v.push_back(c);
    }
    // E = 600 > 483: the 3-stage TMA-store instance.
    {
      GateUpCase c{"3-stage ring, E = 600", {}, 7, 136, 128, 8, 8, true, true, false};
      for (int g = 0; g < 600; ++g) c.sizes.push_back(g % 97 == 0 ? 150 + g : (g % 13 == 0 ? 64 : 0));
      v.push_back(c);
    }
    return v;
  }();
  return cases;
}

void run_gate_up_layout(GuLayout layout, uint64_t salt) {
  const kx::ActParams gated{kx::kActSwiglu, 1.702f, 0.0f};
  const kx::ActParams relu2{kx::kActRelu2, 1.702f, 0.0f};
  const kx::ActParams act = layout == GuLayout::kRelu2 ? relu2 : gated;
  for (const GateUpCase& c : gate_up_cases())
    for (int with_u = 0; with_u < 2; ++with_u) {
      run_gate_up_case(true, layout, with_u != 0, act, c, salt++);
      run_gate_up_case(false, layout, with_u != 0, act, c, salt++);
    }
  if (layout == GuLayout::kRelu2) return;
  // The other gated kinds and the clamp (the activation is chosen at run time, per element).
  const kx::ActParams kinds[] = {{kx::kActSwiglu, 1.702f, 0.75f},
                                 {kx::kActQuickGeglu, 1.702f, 0.75f},
                                 {kx::kActGeglu, 1.702f, 0.0f},
                                 {kx::kActSwigluOai, 1.702f, 0.5f}};
  for (const kx::ActParams& k : kinds) {
    run_gate_up_case(true, layout, true, k, gate_up_cases()[0], salt++);
    run_gate_up_case(false, layout, true, k, gate_up_cases()[2], salt++);
  }
}

TEST_CASE("sm90 TMA-store epilogue: gate-up forward, concatenated, bit for bit", "[gpu][sm90][epilogue][gate_up]") {
  require_sm90();
  run_gate_up_layout(GuLayout::kConcat, 0x5401);
}

TEST_CASE("sm90 TMA-store epilogue: gate-up forward, interleaved, bit for bit", "[gpu][sm90][epilogue][gate_up]") {
  require_sm90();
  run_gate_up_layout(GuLayout::kInterleaved, 0x5501);
}

TEST_CASE("sm90 TMA-store epilogue: relu2 forward, bit for bit", "[gpu][sm90][epilogue][gate_up]") {
  require_sm90();
  run_gate_up_layout(GuLayout::kRelu2, 0x5601);
}

struct WgradCase {
  const char* name;
  std::vector<int> sizes;
  int m, n;
};

void run_wgrad_case(bool bf16, const WgradCase& wc, uint64_t salt) {
  INFO("wgrad case " << wc.name << (bf16 ? " bf16" : " f16"));
  auto rng = moekit::test::make_rng(salt);
  const int G = static_cast<int>(wc.sizes.size());
  const std::vector<int32_t> off = offsets_of(wc.sizes);
  const int64_t R = off.back() > 0 ? off.back() : 1;
  DeviceBuffer offsets = DeviceBuffer::from(off);
  DeviceBuffer x = random_device(bf16, rng, static_cast<size_t>(R) * wc.m, -1.0f, 1.0f);
  DeviceBuffer y = random_device(bf16, rng, static_cast<size_t>(R) * wc.n, -1.0f, 1.0f);
  const size_t elems = static_cast<size_t>(G) * wc.m * wc.n;
  DeviceBuffer out0(elems * sizeof(uint16_t)), out1(out0.bytes()), out2(out0.bytes());

  kx::GroupedGemmProblem p{};
  p.axis = kx::kAxisK;
  p.num_groups = G;
  p.offsets = offsets.get<int32_t>();
  p.max_rows = R;
  p.m = wc.m;
  p.n = wc.n;
  p.a = x.get();
  p.lda = wc.m;
  p.b = y.get();
  p.ldb = wc.n;
  p.splits = 1;
  REQUIRE(k90::takes(p, kx::kEpiWgrad));

  kx::EpilogueParams ep{};
  DeviceBuffer* outs[3] = {&out0, &out1, &out2};
  const bool tma[3] = {false, true, true};
  for (int i = 0; i < 3; ++i) {
    outs[i]->poison(kPoison);
    ep.c = outs[i]->get();
    if (tma[i]) REQUIRE(k90::tma_store_takes(p, kx::kEpiWgrad, ep));
    REQUIRE(shim::launch_wgrad(bf16, p, ep, tma[i]) == cudaSuccess);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  }
  const std::vector<uint16_t> h0 = out0.to_host<uint16_t>(), h1 = out1.to_host<uint16_t>(),
                              h2 = out2.to_host<uint16_t>();
  int64_t unwritten = 0, nonzero_empty = 0;
  for (int g = 0; g < G; ++g)
    for (size_t i = 0; i < static_cast<size_t>(wc.m) * wc.n; ++i) {
      const float v = bits_to_float(bf16, h1[static_cast<size_t>(g) * wc.m * wc.n + i]);
      unwritten += std::isnan(v) ? 1 : 0;
      nonzero_empty += wc.sizes[g] == 0 && v != 0.0f ? 1 : 0;  // an empty expert's gradient is 0
    }
  REQUIRE(unwritten == 0);
  REQUIRE(nonzero_empty == 0);
  REQUIRE(std::memcmp(h0.data(), h1.data(), elems * sizeof(uint16_t)) == 0);
  REQUIRE(std::memcmp(h1.data(), h2.data(), elems * sizeof(uint16_t)) == 0);
}

TEST_CASE("sm90 TMA-store epilogue: weight gradients (splits = 1), bit for bit", "[gpu][sm90][epilogue]") {
  require_sm90();
  // m tail 200 = 128 + 72 (m tile 1: warpgroup 0 rows 128..191, warpgroup 1 rows 192..199 of a
  // box of 64: clipped at M, not written into the next group), n tail 328, k tails (rows not a
  // multiple of 64), empty experts (zero gradients through the TMA store).
  const std::vector<WgradCase> cases = {
      {"m/n/k tails, empty experts", {100, 0, 64, 1, 0, 333, 129}, 200, 328},
      {"dsv3-like tile mix, many tiles per CTA", {512, 0, 700, 256, 64, 0, 1000, 130}, 520, 1032},
      {"one group, narrow", {77}, 64, 8},
  };
  uint64_t salt = 0x5301;
  for (const WgradCase& c : cases) {
    run_wgrad_case(true, c, salt++);
    run_wgrad_case(false, c, salt++);
  }
}

}  // namespace
