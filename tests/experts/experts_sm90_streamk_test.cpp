// The stream-K tail of the Hopper grouped GEMM (grouped_problem.cuh StreamKTail; the whole-tile
// launch and the tail launch of grouped_gemm_sm90.cuh) against the same kernels without it, in one
// binary (experts_sm90_tiles_launch.cu). Problems are sized from the device's SM count so that the
// tail engages (the host-side schedule says so first): two waves of tiles and 1 .. 4 more, K = 2584
// (41 k tiles, the last one partial), column tails, straddling and empty groups.
//   - Small-integer operands: every fp32 sum is exact in any order, so the outputs (h, u, y, dx)
//     must equal the untailed launch's byte for byte, poison outside the groups included.
//   - The flags must be zero after every launch (each raised flag is consumed once), so a second
//     launch without zeroing them gives the same bytes.
//   - Random operands: the tail's tiles sum k in two pieces; the outputs agree with the untailed
//     ones to one rounding of the dtype, and repeat bit for bit.
//   - The 64-row tile: the store kinds have a tail, the gate-up kinds none (their tail kernel is the
//     128-row register-direct one); with slots given, the whole-tile launch must then run all tiles.
//   - On the legacy stream (a plain second launch) and on a created one (a programmatic dependent).
// Exits 77 (SKIP) without a compute capability 9.0 device.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/experts/grouped_gemm.hpp"
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

constexpr int kPoison = 0xff;  // 0xffff: a NaN in bf16

enum class Kind { kGateUp, kRelu2, kDown, kDx };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kGateUp: return "gate-up SwiGLU concatenated, with u";
    case Kind::kRelu2: return "relu2 forward";
    case Kind::kDown: return "down (kEpiStore, B KN, bias, weight after down)";
    case Kind::kDx: return "dx (kEpiStore, B NK)";
  }
  return "?";
}

int sm_count() {
  int device = 0, sms = 0;
  REQUIRE(cudaGetDevice(&device) == cudaSuccess);
  REQUIRE(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess);
  return sms;
}

DeviceBuffer bf16_buffer(std::mt19937_64& rng, size_t n, bool integers) {
  std::vector<uint16_t> h(n);
  std::uniform_int_distribution<int> small(-2, 2);
  std::uniform_real_distribution<float> real(-1.0f, 1.0f);
  for (auto& x : h) x = moekit::test::float_to_bf16_bits(integers ? static_cast<float>(small(rng)) : real(rng));
  return DeviceBuffer::from(h);
}

struct Outputs {
  std::vector<uint16_t> c, u;
};

struct StreamK {
  DeviceBuffer partials, flags;
  explicit StreamK(int slots)
      : partials(static_cast<size_t>(slots) * kx::kStreamKSlotFloats * 4),
        flags(static_cast<size_t>(slots) * kx::kStreamKSlotFlags * 4) {
    partials.poison(kPoison);  // the fixups read only what the partials wrote
    REQUIRE(cudaMemset(flags.get(), 0, flags.bytes()) == cudaSuccess);
  }
  bool flags_zero() const {
    for (int32_t f : flags.to_host<int32_t>())
      if (f != 0) return false;
    return true;
  }
};

// One problem of `kind` on `tile`: untailed, then twice with the tail (flags zeroed once), on
// `stream`. Returns the untailed and the first tailed outputs after checking the second repeats the
// first bit for bit and the flags are left zero.
void run_pair(Kind kind, k90::Tile tile, bool integers, cudaStream_t stream, uint64_t salt, Outputs* plain,
              Outputs* tailed, bool* engaged) {
  auto rng = moekit::test::make_rng(salt);
  const int S = sm_count();
  const int bm = tile == k90::Tile::k64 ? 64 : 128;
  // Row tiles X of bm rows over 5 groups (one empty, tails 1 .. bm - 1), X * tiles_n = 2 S + 1 .. 4.
  const bool gate_up = kind == Kind::kGateUp || kind == Kind::kRelu2;
  const int I = 392;                                      // h columns: tiles_n = 2 (gate-up: 2 I = 784 -> 4)
  const int N = kind == Kind::kGateUp ? 2 * I : I;        // GEMM columns
  const int tiles_n = (N + 255) / 256;
  const int K = 2584;
  const int X = (2 * S + tiles_n) / tiles_n;
  const int per = X / 4;
  const std::vector<int> sizes = {per * bm - 5, 0, (per - 1) * bm + 1, per * bm, (X - 3 * per + 1) * bm - bm / 2};
  std::vector<int32_t> off(1, 0);
  for (int s : sizes) off.push_back(off.back() + s);
  const int G = static_cast<int>(sizes.size());
  const int64_t R = off.back() + 3;  // trailing rows of no group
  int64_t row_tiles = 0;
  for (int s : sizes) row_tiles += (s + bm - 1) / bm;
  const int64_t T = row_tiles * tiles_n;
  const kx::StreamKTail plan = kx::make_stream_k_tail(static_cast<uint32_t>(T), S, (K + 63) / 64, kx::kStreamKSlots);
  INFO(kind_name(kind) << ", tile " << k90::tile_name(tile) << (integers ? ", integers" : ", random") << ", T " << T
                       << " tiles on " << S << " SMs");
  REQUIRE(plan.sk_iters > 0);  // the host-side schedule cuts this problem's tail
  *engaged = S <= kx::kStreamKSlots && !(tile == k90::Tile::k64 && gate_up);

  const bool b_nk = kind == Kind::kDx;
  DeviceBuffer offsets = DeviceBuffer::from(off);
  DeviceBuffer a = bf16_buffer(rng, static_cast<size_t>(R) * K, integers);
  DeviceBuffer b = bf16_buffer(rng, static_cast<size_t>(G) * K * N, integers);
  DeviceBuffer bias = bf16_buffer(rng, static_cast<size_t>(G) * N, integers);
  DeviceBuffer weights = DeviceBuffer::from(moekit::test::uniform(rng, static_cast<size_t>(R), 0.0f, 1.0f));
  kx::GroupedGemmProblem p = moekit::test::sm90::axis_m_problem(G, offsets.get<int32_t>(), R, N, K, a.get(),
                                                                b.get(), b_nk);
  p.gate_up_half = kind == Kind::kGateUp ? I : 0;
  kx::EpilogueParams ep{};
  ep.act = kx::ActParams{kind == Kind::kRelu2 ? kx::kActRelu2 : kx::kActSwiglu, 1.702f, 0.0f};
  ep.inter = I;
  kx::EpiKind epi = kx::kEpiStore;
  const int64_t ldc = gate_up ? I + 8 : N + 8, ldu = N;
  if (gate_up) {
    epi = kind == Kind::kRelu2 ? kx::kEpiRelu2 : kx::kEpiGateUp;
    ep.row_weights = weights.get<float>();
    ep.ldu = ldu;
  } else if (kind == Kind::kDown) {
    ep.row_weights = weights.get<float>();
    ep.bias = bias.get();
    ep.bias_group_stride = N;
    ep.weight_after_down = 1;
  }
  ep.ldc = ldc;
  REQUIRE(k90::takes(p, epi));

  auto run = [&](bool with_tail, StreamK* sk, Outputs* out) {
    DeviceBuffer c(static_cast<size_t>(R * ldc) * 2), u(static_cast<size_t>(R * ldu) * 2);
    c.poison(kPoison);
    u.poison(kPoison);
    ep.c = c.get();
    ep.u = kind == Kind::kGateUp ? u.get() : nullptr;
    kx::GroupedGemmProblem q = p;
    if (with_tail) {
      q.sk_partials = sk->partials.get<float>();
      q.sk_flags = sk->flags.get<int>();
      q.sk_slots = kx::kStreamKSlots;
    }
    REQUIRE(moekit::test::sm90_tiles::launch(tile, q, epi, ep, stream) == cudaSuccess);
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
    out->c = c.to_host<uint16_t>();
    out->u = u.to_host<uint16_t>();
  };
  run(false, nullptr, plain);
  StreamK sk(kx::kStreamKSlots);
  run(true, &sk, tailed);
  REQUIRE(sk.flags_zero());
  Outputs again;
  run(true, &sk, &again);  // flags not zeroed again: the first launch left them so
  REQUIRE(sk.flags_zero());
  REQUIRE(again.c == tailed->c);
  REQUIRE(again.u == tailed->u);
  // What no group owns stays poisoned; what the groups own is written.
  const moekit::test::sm90::PoisonCheck poison =
      moekit::test::sm90::check_poison(tailed->c, R, off.back(), gate_up ? I : N, ldc);
  REQUIRE(poison.unwritten == 0);
  REQUIRE(poison.touched == 0);
}

// A created non-blocking stream (where the tail launch is a programmatic dependent).
struct CreatedStream {
  cudaStream_t s = nullptr;
  CreatedStream() { REQUIRE(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess); }
  ~CreatedStream() { cudaStreamDestroy(s); }
};

const Kind kKinds[] = {Kind::kGateUp, Kind::kRelu2, Kind::kDown, Kind::kDx};
const k90::Tile kTiles[] = {k90::Tile::k128, k90::Tile::k64};

}  // namespace

TEST_CASE("sm90 stream-K tail: exact sums equal the untailed launch byte for byte, flags left zero",
          "[gpu][sm90][streamk]") {
  moekit::test::sm90::require_sm90("the sm_90a stream-K tests");
  CreatedStream created;
  uint64_t salt = 0x5c01;
  int engaged = 0;
  for (cudaStream_t stream : {static_cast<cudaStream_t>(nullptr), created.s})
    for (k90::Tile tile : kTiles)
      for (Kind kind : kKinds) {
        INFO((stream == nullptr ? "legacy stream" : "created stream (programmatic tail)"));
        Outputs plain, tailed;
        bool on = false;
        run_pair(kind, tile, true, stream, salt++, &plain, &tailed, &on);
        engaged += on ? 1 : 0;
        REQUIRE(tailed.c == plain.c);
        REQUIRE(tailed.u == plain.u);
      }
  REQUIRE(engaged >= 12);  // every 128-row kind and the 64-row store kinds, on both streams
}

TEST_CASE("sm90 stream-K tail: random operands within one rounding of the untailed launch",
          "[gpu][sm90][streamk]") {
  moekit::test::sm90::require_sm90("the sm_90a stream-K tests");
  CreatedStream stream;
  uint64_t salt = 0x5c41;
  for (k90::Tile tile : kTiles)
    for (Kind kind : kKinds) {
      Outputs plain, tailed;
      bool on = false;
      run_pair(kind, tile, false, stream.s, salt++, &plain, &tailed, &on);
      // Two fp32 partial sums added instead of one running sum: the accumulators differ by a few
      // fp32 roundings of the partial sums' magnitude (~17 for 2584 products of [-1, 1]), which
      // SwiGLU multiplies by u. So: one bf16 rounding of the larger value (2^-7 relative) plus
      // 2^-8 of the outputs' RMS. A lost or doubled partial is off by the order of the RMS.
      REQUIRE(tailed.c.size() == plain.c.size());
      double sum2 = 0;
      int64_t finite = 0;
      for (uint16_t bits : plain.c) {
        const float x = moekit::test::bf16_bits_to_float(bits);
        if (std::isfinite(x)) sum2 += double(x) * x, ++finite;
      }
      REQUIRE(finite > 0);
      const float rms = static_cast<float>(std::sqrt(sum2 / finite));
      int64_t differ = 0, beyond = 0;
      float worst = 0, worst_x = 0, worst_y = 0;
      for (size_t i = 0; i < plain.c.size(); ++i) {
        if (tailed.c[i] == plain.c[i]) continue;
        ++differ;
        const float x = moekit::test::bf16_bits_to_float(plain.c[i]);
        const float y = moekit::test::bf16_bits_to_float(tailed.c[i]);
        const float excess = std::fabs(x - y) - (std::max(std::fabs(x), std::fabs(y)) * 0x1p-7f + rms * 0x1p-8f);
        if (!(excess <= 0)) ++beyond;
        if (!(excess <= worst)) worst = excess, worst_x = x, worst_y = y;
      }
      INFO(differ << " of " << plain.c.size() << " elements differ; output RMS " << rms << "; worst " << worst_x
                  << " against " << worst_y);
      REQUIRE(beyond == 0);
      if (!on) REQUIRE(differ == 0);  // no tail: the very same launch
    }
}
