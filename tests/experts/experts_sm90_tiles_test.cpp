// The tile configurations of the Hopper grouped GEMM (sm90::Tile: 128 x 256, 64 x 256, and for
// the forward kinds (B KN) 128 x 256 in clusters of two with B multicast; grouped_gemm_sm90.hpp
// TileConfigT) against each other, bit for bit, in one binary: experts_sm90_tiles_launch.cu instantiates every configuration of every
// axis-M kind that takes one (bf16), whatever sm90::choose_tile picks. Each output element is the
// same wgmma sum over k in the same order whatever the tile, so every configuration must write the
// very bits of the 128 x 256 one, which the epilogue test holds to the register-direct stores and
// the experts suites to the CPU reference. Kinds: the forward gate-up (SwiGLU concatenated and
// interleaved, relu2; h alone and h with u), the forward down projection (kEpiStore, B KN, bias and
// weights after down) and dx (kEpiStore, B NK), the staged activation-backward dgrad (concatenated,
// interleaved, relu2; du, h' and the dp partials). Groups: straddling 64- and 128-row tiles, empty
// experts, one row, one warpgroup and one row past it, a cluster's second CTA past its group,
// trailing rows of no group, column tails, 257 groups, many tiles per CTA. Outputs are poisoned first: what no group owns must stay so.
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
#include "tests/experts/experts_sm90_support.hpp"
#include "tests/experts/experts_sm90_tiles_launch.hpp"
#include "tests/support/catch.hpp"
#include "tests/support/device.hpp"
#include "tests/support/numeric.hpp"
#include "tests/support/random.hpp"

namespace {

using moekit::test::DeviceBuffer;
namespace kx = moekit::kernels::experts;
namespace k90 = moekit::kernels::experts::sm90;

constexpr int kPoison = 0xff;  // 0xffff: a NaN in bf16, never a finite result

DeviceBuffer random_bf16(std::mt19937_64& rng, size_t n, float lo, float hi) {
  const std::vector<float> f = moekit::test::uniform(rng, n, lo, hi);
  std::vector<uint16_t> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = moekit::test::float_to_bf16_bits(f[i]);
  return DeviceBuffer::from(h);
}

struct GroupCase {
  const char* name;
  std::vector<int> sizes;  // rows per group (0: empty expert)
  int trailing;            // rows after the last group (owned by none)
  int n, k;                // columns of the GEMM (h columns I for the gate-up and act kinds) and depth
};

const std::vector<GroupCase>& group_cases() {
  static const std::vector<GroupCase> cases = [] {
    std::vector<GroupCase> v;
    // Tails of 64- and 128-row tiles: one row, a warpgroup less one, exactly one, one past; a
    // tile less one, exactly one, one past; empty experts; trailing rows; column tail 200 (the
    // second 256-column tile of a 2 I = 400 gate-up, boxes at 128 + 64 clipped).
    v.push_back({"straddle", {300, 0, 1, 63, 64, 65, 0, 127, 128, 129, 191, 192, 193, 700, 0}, 5, 200, 192});
    // 257 groups, most empty (the row-tile prefix of many groups), a few short.
    {
      GroupCase c{"257 groups", {}, 3, 136, 128};
      for (int g = 0; g < 257; ++g) c.sizes.push_back(g % 31 == 0 ? 40 + g : (g % 17 == 0 ? 64 : 0));
      v.push_back(c);
    }
    // Many tiles per CTA: ~100 row tiles of 128 (200 of 64) x 3 column tiles on 132 SMs.
    {
      GroupCase c{"many tiles per CTA", {}, 0, 520, 256};
      for (int g = 0; g < 24; ++g) c.sizes.push_back(g % 5 == 3 ? 0 : 384 + 37 * g);
      v.push_back(c);
    }
    return v;
  }();
  return cases;
}

std::vector<int32_t> offsets_of(const std::vector<int>& sizes) {
  std::vector<int32_t> off(1, 0);
  for (int s : sizes) off.push_back(off.back() + s);
  return off;
}

enum class Kind { kGateUpConcat, kGateUpInterleaved, kRelu2, kDown, kDx, kActConcat, kActInterleaved, kActRelu2 };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kGateUpConcat: return "gate-up concatenated";
    case Kind::kGateUpInterleaved: return "gate-up interleaved";
    case Kind::kRelu2: return "relu2 forward";
    case Kind::kDown: return "down (kEpiStore, B KN)";
    case Kind::kDx: return "dx (kEpiStore, B NK)";
    case Kind::kActConcat: return "act backward concatenated";
    case Kind::kActInterleaved: return "act backward interleaved";
    case Kind::kActRelu2: return "act backward relu2";
  }
  return "?";
}

// One problem of `kind` on the groups of `gc`, run on every tile; every output buffer of every tile
// must equal the 128 x 256 tile's byte for byte, and that one must have written what the groups own.
void run_case(Kind kind, bool with_u, const GroupCase& gc, uint64_t salt) {
  INFO("case " << gc.name << ", " << kind_name(kind) << (with_u ? ", with u" : ""));
  auto rng = moekit::test::make_rng(salt);
  const int G = static_cast<int>(gc.sizes.size());
  const std::vector<int32_t> off = offsets_of(gc.sizes);
  const int64_t R = off.back() + gc.trailing;
  const bool gate_up = kind == Kind::kGateUpConcat || kind == Kind::kGateUpInterleaved || kind == Kind::kRelu2;
  const bool act_bwd = kind == Kind::kActConcat || kind == Kind::kActInterleaved || kind == Kind::kActRelu2;
  const bool relu2 = kind == Kind::kRelu2 || kind == Kind::kActRelu2;
  const bool interleaved = kind == Kind::kGateUpInterleaved || kind == Kind::kActInterleaved;
  const int I = gc.n;                                 // h columns of the gate-up and act kinds
  const int NU = relu2 ? I : 2 * I;                   // u columns
  const int N = gate_up ? NU : gc.n;                  // GEMM columns
  const int K = gc.k;
  const bool b_nk = kind == Kind::kDx || act_bwd;

  DeviceBuffer offsets = DeviceBuffer::from(off);
  DeviceBuffer a = random_bf16(rng, static_cast<size_t>(R * K), -1.0f, 1.0f);
  DeviceBuffer b = random_bf16(rng, static_cast<size_t>(G) * K * N, -1.0f, 1.0f);
  DeviceBuffer bias = random_bf16(rng, static_cast<size_t>(G) * N, -0.5f, 0.5f);
  DeviceBuffer u_saved = random_bf16(rng, static_cast<size_t>(R * NU), -2.0f, 2.0f);
  const std::vector<float> pw = moekit::test::uniform(rng, static_cast<size_t>(R), 0.0f, 1.0f);
  DeviceBuffer weights = DeviceBuffer::from(pw);

  kx::GroupedGemmProblem p =
      moekit::test::sm90::axis_m_problem(G, offsets.get<int32_t>(), R, N, K, a.get(), b.get(), b_nk);
  p.gate_up_half = kind == Kind::kGateUpConcat ? I : 0;

  kx::EpilogueParams ep{};
  ep.row_weights = weights.get<float>();
  ep.act = kx::ActParams{relu2 ? kx::kActRelu2 : kx::kActSwiglu, 1.702f, 0.0f};
  ep.interleaved = interleaved ? 1 : 0;
  ep.inter = I;
  kx::EpiKind epi = kx::kEpiStore;
  // Outputs: c (h, y, dx or du), u (gate-up with u), h' and dp (act backward); column counts and
  // row strides per output.
  int64_t ldc = N, c_cols = N, ldu = NU, ldh = I, ld_dp = (N + k90::TileConfig::kBN - 1) / k90::TileConfig::kBN;
  if (gate_up) {
    epi = relu2 ? kx::kEpiRelu2 : kx::kEpiGateUp;
    ldc = I + 8;  // padded h rows
    c_cols = I;
    ep.ldu = ldu;
  } else if (act_bwd) {
    epi = kx::kEpiBwdAct;
    ldc = NU;
    c_cols = NU;
    ep.u = u_saved.get();
    ep.ldu = NU;
    ep.ldh = ldh;
  } else {
    ldc = N + 8;
    if (kind == Kind::kDown) {
      ep.bias = bias.get();
      ep.bias_group_stride = N;
      ep.weight_after_down = 1;
    } else {
      ep.row_weights = nullptr;
    }
  }
  ep.ldc = ldc;
  ep.ld_dp = ld_dp;
  REQUIRE(k90::takes(p, epi));

  constexpr int kTiles = k90::kTileCount;
  std::vector<DeviceBuffer> c, u, h, dp;
  for (int t = 0; t < kTiles; ++t) {
    c.emplace_back(static_cast<size_t>(R * ldc) * 2);
    u.emplace_back(static_cast<size_t>(R * ldu) * 2);
    h.emplace_back(static_cast<size_t>(R * ldh) * 2);
    dp.emplace_back(static_cast<size_t>(R * ld_dp) * 4);
  }
  for (int t = 0; t < kTiles; ++t) {
    INFO("tile " << k90::tile_name(static_cast<k90::Tile>(t)));
    c[t].poison(kPoison);
    u[t].poison(kPoison);
    h[t].poison(kPoison);
    dp[t].poison(kPoison);
    ep.c = c[t].get();
    if (gate_up) ep.u = with_u ? u[t].get() : nullptr;
    if (act_bwd) {
      ep.h = h[t].get();
      ep.dp_partial = dp[t].get<float>();
    }
    if (!k90::tile_takes(static_cast<k90::Tile>(t), p)) {  // B NK: no cluster instance; refused, nothing written
      REQUIRE(moekit::test::sm90_tiles::launch(static_cast<k90::Tile>(t), p, epi, ep) == cudaErrorInvalidValue);
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
      REQUIRE(moekit::test::still_poisoned(c[t], kPoison));
      REQUIRE(moekit::test::still_poisoned(h[t], kPoison));
      continue;
    }
    REQUIRE(moekit::test::sm90_tiles::launch(static_cast<k90::Tile>(t), p, epi, ep) == cudaSuccess);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  }
  // The 128 x 256 tile wrote every element its groups own (not the NaN poison).
  const std::vector<uint16_t> c0 = c[0].to_host<uint16_t>();
  const moekit::test::sm90::PoisonCheck poison = moekit::test::sm90::check_poison(c0, R, off.back(), c_cols, ldc);
  REQUIRE(poison.unwritten == 0);
  REQUIRE(poison.touched == 0);
  for (int t = 1; t < kTiles; ++t) {
    INFO("tile " << k90::tile_name(static_cast<k90::Tile>(t)) << " against 128x256");
    if (!k90::tile_takes(static_cast<k90::Tile>(t), p)) continue;
    REQUIRE(c[t].to_host<uint16_t>() == c0);
    REQUIRE(u[t].to_host<uint16_t>() == u[0].to_host<uint16_t>());
    REQUIRE(h[t].to_host<uint16_t>() == h[0].to_host<uint16_t>());
    REQUIRE(dp[t].to_host<uint32_t>() == dp[0].to_host<uint32_t>());
  }
  if (gate_up && !with_u) REQUIRE(moekit::test::still_poisoned(u[0], kPoison));
}

}  // namespace

TEST_CASE("sm90 tiles: forward gate-up on every tile, bit for bit", "[gpu][sm90][tiles]") {
  moekit::test::sm90::require_sm90("the sm_90a tile tests");
  uint64_t salt = 0x7101;
  for (const GroupCase& gc : group_cases())
    for (int with_u = 0; with_u < 2; ++with_u) {
      run_case(Kind::kGateUpConcat, with_u != 0, gc, salt++);
      run_case(Kind::kGateUpInterleaved, with_u != 0, gc, salt++);
      run_case(Kind::kRelu2, with_u != 0, gc, salt++);
    }
}

TEST_CASE("sm90 tiles: down projection and dx on every tile, bit for bit", "[gpu][sm90][tiles]") {
  moekit::test::sm90::require_sm90("the sm_90a tile tests");
  uint64_t salt = 0x7201;
  for (const GroupCase& gc : group_cases()) {
    run_case(Kind::kDown, false, gc, salt++);
    run_case(Kind::kDx, false, gc, salt++);
  }
}

TEST_CASE("sm90 tiles: activation backward (staged) on every tile, bit for bit", "[gpu][sm90][tiles]") {
  moekit::test::sm90::require_sm90("the sm_90a tile tests");
  uint64_t salt = 0x7301;
  for (const GroupCase& gc : group_cases()) {
    run_case(Kind::kActConcat, false, gc, salt++);
    run_case(Kind::kActInterleaved, false, gc, salt++);
    run_case(Kind::kActRelu2, false, gc, salt++);
  }
}
