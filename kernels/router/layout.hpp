// Index arithmetic of the router kernels that the CPU suite replays (plain C++, host and device):
// the fast paths' chunk-major shared-memory arrays, the fast forward's walk over tokens, and the
// generic forward's row staging. The kernels call these functions; tests/router/router_cpu_test.cpp
// ("layout ...") runs the same ones on the host.
#pragma once

#include <cstdint>

#include "kernels/router/span.hpp"  // MOEKIT_SPAN_FN, Bytes

namespace moekit::kernels::router {

// ---- chunk-major per-team arrays (fast forward: bias, aux sums, selection values) ------------
// A team of TPT lanes holds experts [l V, l V + V) in lane l. Per team, a float array of V TPT
// entries stored as [V / 4][TPT][4]: slot j of lane l at float offset ((j / 4) TPT + l) 4 + j % 4,
// so the lanes of a warp access consecutive 16-byte chunks (no bank conflicts).
MOEKIT_SPAN_FN int chunk_major_offset(int lane, int slot, int tpt) { return ((slot >> 2) * tpt + lane) * 4 + (slot & 3); }

// The same offset for expert e (lane e / V, slot e % V).
MOEKIT_SPAN_FN int chunk_major_offset_of_expert(int e, int v, int tpt) { return chunk_major_offset(e / v, e % v, tpt); }

// ---- the fast forward's walk over tokens ------------------------------------------------------
// Team `team_in_warp` of global warp w (of warps_total) handles tokens t0 = w tpw + team_in_warp,
// t0 + stride, t0 + 2 stride, ... (stride = warps_total tpw, tpw = teams per warp); the warp runs
// while its first team's token first_of_warp + i stride is below T, so every lane of the warp
// runs the same iterations.
struct TokenWalk {
  int64_t first_token;  // this team's first token
  int64_t stride;       // tokens between steps
  int64_t first_of_warp;
};

MOEKIT_SPAN_FN TokenWalk token_walk(int64_t warp_global, int64_t warps_total, int teams_per_warp, int team_in_warp) {
  TokenWalk w{};
  w.first_token = warp_global * teams_per_warp + team_in_warp;
  w.stride = warps_total * teams_per_warp;
  w.first_of_warp = w.first_token - team_in_warp;
  return w;
}

// ---- the generic forward's row staging ----------------------------------------------------------
// A row of `bytes` bytes (its start aligned to vec_bytes: 16, 8, 4 or 2) copied by the 32 lanes of
// a warp, lane-strided: copy(offset, Bytes<W>{}) for whole W = min(vec_bytes, 16)-byte chunks
// (W >= 4), then the rest element by element (W = the element size). Every byte of [0, bytes) is
// copied exactly once, nothing outside it, each access aligned to its size.
template <int kElemBytes, class Copy>
MOEKIT_SPAN_FN void visit_row(int bytes, int vec_bytes, int lane, Copy copy) {
  static_assert(kElemBytes == 2 || kElemBytes == 4, "16- or 32-bit elements");
  int done = 0;
  if (vec_bytes >= 16) {
    const int n = bytes / 16;
    for (int i = lane; i < n; i += 32) copy(i * 16, Bytes<16>{});
    done = n * 16;
  } else if (vec_bytes >= 8) {
    const int n = bytes / 8;
    for (int i = lane; i < n; i += 32) copy(i * 8, Bytes<8>{});
    done = n * 8;
  } else if (vec_bytes >= 4) {
    const int n = bytes / 4;
    for (int i = lane; i < n; i += 32) copy(i * 4, Bytes<4>{});
    done = n * 4;
  }
  for (int b = done + lane * kElemBytes; b < bytes; b += 32 * kElemBytes) copy(b, Bytes<kElemBytes>{});
}

}  // namespace moekit::kernels::router
