// EP on the CPU: the reference exchange (who sends what to whom, the receive order, drops, the
// rank-ordered sums), the host side of the protocol (for simulated ranks, what rank a sends to b
// in every chunk is exactly what b expects from a, at the rows the reference says), the sizes,
// and every argument check of the C API up to the point where a device is needed.
#include <algorithm>
#include <cstring>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "moekit/ep.h"
#include "src/common/error.hpp"
#include "src/ep/ep_config.hpp"
#include "src/ep/ep_handle.hpp"
#include "src/ep/ep_plan.hpp"
#include "tests/ep/ep_problem.hpp"
#include "tests/ep/ep_script.hpp"
#include "tests/reference/ep_ref.hpp"
#include "tests/support/catch.hpp"
#include "tests/support/random.hpp"

namespace {

using moekit::ref::EpExchange;
using moekit::ref::EpProblem;
using moekit::ref::EpRecvRow;
using moekit::test::ep::make_routing;
using moekit::test::ep::RoutingShape;

bool message_has(const char* needle) {
  return std::strstr(moekit_get_last_error(), needle) != nullptr;
}

// The internals compiled into this test keep their own last-error message (the library's copy
// is hidden inside libmoekit.so).
#define REQUIRE_INTERNAL_STATUS(expr, status, needle)                                        \
  do {                                                                                      \
    const moekit_status_t s_ = (expr);                                                      \
    INFO(#expr << " -> " << moekit_status_string(s_) << ": " << moekit::last_error());     \
    REQUIRE(s_ == (status));                                                                \
    CHECK(std::strstr(moekit::last_error(), needle) != nullptr);                            \
  } while (0)

#define REQUIRE_STATUS(expr, status, ...)                                                    \
  do {                                                                                      \
    const moekit_status_t s_ = (expr);                                                      \
    INFO(#expr << " -> " << moekit_status_string(s_) << ": " << moekit_get_last_error());  \
    REQUIRE(s_ == (status));                                                                \
    for (const char* needle_ : {__VA_ARGS__}) {                                             \
      INFO("message should name '" << needle_ << "'");                                     \
      CHECK(message_has(needle_));                                                          \
    }                                                                                       \
  } while (0)

moekit_ep_config_t base_config(int n, int E, int K, int64_t H, int64_t max_tokens,
                               moekit_ep_mode_t mode, int chunks) {
  moekit_ep_config_t c;
  REQUIRE(moekit_ep_config_init(&c, sizeof(c)) == MOEKIT_STATUS_SUCCESS);
  c.num_ranks = n;
  c.num_experts = E;
  c.top_k = K;
  c.hidden = H;
  c.max_tokens = max_tokens;
  c.mode = mode;
  c.num_chunks = chunks;
  return c;
}

// ---- the reference ---------------------------------------------------------------------------

TEST_CASE("ep reference: a hand-worked exchange", "[ep][reference]") {
  // n = 2, E = 4 (rank 0 owns experts 0-1, rank 1 owns 2-3), K = 2.
  EpProblem p;
  p.num_ranks = 2;
  p.num_experts = 4;
  p.top_k = 2;
  p.num_chunks = 1;
  p.num_tokens = {4, 2};
  p.indices = {{0, 1, /**/ 1, 2, /**/ 3, 2, /**/ -1, 5}, {2, 0, /**/ 0, 1}};
  p.masks = {{}, {1, 0}};
  const EpExchange x = moekit::ref::ep_exchange(p);
  // Token destinations: rank 0: {0}, {0, 1}, {1}, {} (invalid ids); rank 1: {0, 1}, {} (masked).
  CHECK(x.dests[0][0] == std::vector<int>{0});
  CHECK(x.dests[0][1] == std::vector<int>{0, 1});
  CHECK(x.dests[0][2] == std::vector<int>{1});
  CHECK(x.dests[0][3].empty());
  CHECK(x.dests[1][0] == std::vector<int>{0, 1});
  CHECK(x.dests[1][1].empty());
  // Rank 0 receives (0,0) (0,1) (1,0); rank 1 receives (0,1) (0,2) (1,0): source, then token.
  REQUIRE(x.rows[0].size() == 3);
  REQUIRE(x.rows[1].size() == 3);
  const std::pair<int, int64_t> want0[] = {{0, 0}, {0, 1}, {1, 0}};
  const std::pair<int, int64_t> want1[] = {{0, 1}, {0, 2}, {1, 0}};
  for (int i = 0; i < 3; ++i) {
    CHECK(x.rows[0][i].src == want0[i].first);
    CHECK(x.rows[0][i].token == want0[i].second);
    CHECK(x.rows[1][i].src == want1[i].first);
    CHECK(x.rows[1][i].token == want1[i].second);
  }
  CHECK(x.sent[0] == std::vector<int64_t>{2, 2});
  CHECK(x.sent[1] == std::vector<int64_t>{1, 1});
  // Combine at rank 0, H = 1: token 1 sums its row at rank 0 (row 1) and at rank 1 (row 0).
  const std::vector<std::vector<float>> partials = {{1.5f, 2.25f, 4.0f}, {8.0f, 16.0f, 32.0f}};
  const std::vector<float> y = moekit::ref::ep_combine(p, x, 0, 1, partials);
  CHECK(y == std::vector<float>{1.5f, 2.25f + 8.0f, 16.0f, 0.0f});
}

TEST_CASE("ep reference: capacity blocks, gaps and drops", "[ep][reference]") {
  // n = 2, E = 2, K = 1, C = 2 chunks, capacity 2 -> cc = 1 row per (source, chunk).
  EpProblem p;
  p.num_ranks = 2;
  p.num_experts = 2;
  p.top_k = 1;
  p.num_chunks = 2;
  p.capacity_mode = true;
  p.capacity = 2;
  p.num_tokens = {4, 1};
  p.indices = {{1, 1, 0, 1}, {1}};  // rank 0: chunk 0 = tokens 0-1, chunk 1 = tokens 2-3
  p.masks = {{}, {}};
  const EpExchange x = moekit::ref::ep_exchange(p);
  REQUIRE(x.chunk_capacity == 1);
  // Rank 1 receives blocks (s=0,c=0) (0,1) (1,0) (1,1): token 0 (token 1 dropped), token 3,
  // rank 1's token 0, a gap (rank 1 has one token, so its chunk 1 is empty).
  REQUIRE(x.rows[1].size() == 4);
  CHECK(x.rows[1][0].token == 0);
  CHECK(x.rows[1][1].token == 3);
  CHECK((x.rows[1][2].src == 1 && x.rows[1][2].token == 0));
  CHECK(x.rows[1][3].src == -1);
  CHECK(x.dropped[0] == 1);
  CHECK(x.row_at[0][1][0] == -1);
  // Rank 0 receives token 2 of its own at block (0, 1).
  CHECK((x.rows[0][1].src == 0 && x.rows[0][1].token == 2));
}

TEST_CASE("ep reference: the exchange agrees with its definition on random routing",
          "[ep][reference]") {
  auto rng = moekit::test::make_rng(0xe9a1);
  for (int trial = 0; trial < 40; ++trial) {
    RoutingShape s;
    s.num_ranks = std::vector<int>{1, 2, 3, 4, 8}[trial % 5];
    s.num_experts = s.num_ranks * std::vector<int>{1, 2, 5, 8}[trial % 4];
    s.top_k = 1 + trial % std::min(s.num_experts, 6);
    s.num_chunks = 1 + trial % 4;
    s.capacity_mode = trial % 2 == 1;
    for (int r = 0; r < s.num_ranks; ++r) s.num_tokens.push_back((trial * 7 + r * 13) % 40);
    s.capacity = s.capacity_mode ? 1 + trial % 9 : 0;
    s.mask_fraction = trial % 3 == 0 ? 0.2 : 0.0;
    s.invalid_fraction = 0.05;
    s.duplicate_fraction = 0.1;
    s.local_only_fraction = 0.2;
    const auto routing = make_routing(s, rng);
    const EpProblem& p = routing.problem;
    const EpExchange x = moekit::ref::ep_exchange(p);
    INFO("trial " << trial);
    const int n = p.num_ranks, K = p.top_k, C = p.num_chunks;
    for (int r = 0; r < n; ++r) {
      const int64_t T = p.num_tokens[r], L = (T + C - 1) / C;
      for (int64_t t = 0; t < T; ++t) {
        // dests: exactly the owners of the valid ids of a real token, ascending, distinct.
        std::vector<int> want;
        const bool real = p.masks[r].empty() || p.masks[r][t] != 0;
        for (int k = 0; k < K && real; ++k) {
          const int32_t e = p.indices[r][t * K + k];
          if (e >= 0 && e < p.num_experts) want.push_back(e / (p.num_experts / n));
        }
        std::sort(want.begin(), want.end());
        want.erase(std::unique(want.begin(), want.end()), want.end());
        REQUIRE(x.dests[r][t] == want);
        for (size_t j = 0; j < want.size(); ++j) {
          const int64_t row = x.row_at[r][t][j];
          if (row < 0) {
            REQUIRE(p.capacity_mode);
            continue;
          }
          const EpRecvRow got = x.rows[want[j]][row];
          REQUIRE((got.src == r && got.token == t));
          if (p.capacity_mode) {
            const int64_t c = t / L;
            REQUIRE(row / x.chunk_capacity == static_cast<int64_t>(r) * C + c);
          }
        }
      }
    }
    for (int d = 0; d < n; ++d) {
      // Order: source ascending, then token ascending (gaps aside); no row twice.
      int64_t last_key = -1;
      for (const EpRecvRow& row : x.rows[d]) {
        if (row.src < 0) continue;
        const int64_t key = static_cast<int64_t>(row.src) * 1000000 + row.token;
        REQUIRE(key > last_key);
        last_key = key;
      }
    }
    // Drops: per (source, destination, chunk) the tokens past cc, and none when capacity >= T.
    for (int r = 0; r < n; ++r) {
      int64_t dropped = 0;
      const int64_t T = p.num_tokens[r], L = (T + C - 1) / C;
      for (int d = 0; d < n && p.capacity_mode; ++d)
        for (int c = 0; c < C; ++c) {
          int64_t count = 0;
          for (int64_t t = c * L; t < std::min((c + 1) * L, T); ++t)
            count += std::count(x.dests[r][t].begin(), x.dests[r][t].end(), d);
          dropped += std::max<int64_t>(0, count - x.chunk_capacity);
        }
      REQUIRE(x.dropped[r] == dropped);
      if (p.capacity_mode && p.capacity >= T) REQUIRE(x.dropped[r] == 0);
    }
  }
}

// ---- the host side of the protocol ------------------------------------------------------------

// What every rank's host layout would hold after the count exchange (exact mode), built from the
// reference's routing, and the configuration the ranks share.
struct SimulatedRanks {
  moekit_ep_config_t config;
  moekit::ep::Dims dims;
  int32_t signature;
  std::vector<std::vector<int64_t>> host_layouts;
};

SimulatedRanks simulate(const EpProblem& p, int64_t hidden) {
  SimulatedRanks sim;
  const int n = p.num_ranks, C = p.num_chunks;
  const int64_t max_tokens = *std::max_element(p.num_tokens.begin(), p.num_tokens.end());
  sim.config = base_config(n, p.num_experts, p.top_k, hidden, max_tokens,
                           p.capacity_mode ? MOEKIT_EP_MODE_CAPACITY : MOEKIT_EP_MODE_EXACT, C);
  sim.config.capacity = p.capacity_mode ? p.capacity : 0;
  REQUIRE(moekit_ep_config_check(&sim.config) == MOEKIT_STATUS_SUCCESS);
  sim.dims = moekit::ep::dims_of(sim.config);
  sim.signature = moekit::ep::config_signature(sim.config);
  sim.host_layouts = moekit::test::ep::reference_host_layouts(sim.dims, sim.signature, p,
                                                              moekit::ref::ep_exchange(p));
  return sim;
}

TEST_CASE("ep protocol: both ends of every pair agree, and rows land where the reference says",
          "[ep][protocol]") {
  auto rng = moekit::test::make_rng(0x9a0c);
  for (int trial = 0; trial < 48; ++trial) {
    RoutingShape s;
    s.num_ranks = std::vector<int>{2, 3, 4, 8, 1, 5}[trial % 6];
    s.num_experts = s.num_ranks * (1 + trial % 5);
    s.top_k = 1 + trial % std::min(s.num_experts, 8);
    s.num_chunks = 1 + (trial / 2) % 5;
    s.capacity_mode = trial % 2 == 1;
    for (int r = 0; r < s.num_ranks; ++r)
      s.num_tokens.push_back(r == 1 && trial % 3 == 0 ? 0 : 1 + (trial * 11 + r * 17) % 300);
    s.capacity = s.capacity_mode ? 1 + trial * 5 % 120 : 0;
    s.invalid_fraction = 0.02;
    s.local_only_fraction = 0.3;
    const auto routing = make_routing(s, rng);
    const EpProblem& p = routing.problem;
    const EpExchange x = moekit::ref::ep_exchange(p);
    const SimulatedRanks sim = simulate(p, 24);
    const moekit::ep::Dims& d = sim.dims;
    const int n = p.num_ranks, C = p.num_chunks;
    INFO("trial " << trial << " n " << n << " C " << C << (p.capacity_mode ? " capacity" : " exact"));
    auto hl_of = [&](int r) -> const int64_t* {
      return p.capacity_mode ? nullptr : sim.host_layouts[r].data();
    };
    for (int r = 0; r < n; ++r) {
      const moekit::ep::RowSpaces rows = moekit::ep::row_spaces(d, hl_of(r));
      const moekit::ep::RowSpaces worst = moekit::ep::row_spaces(d, nullptr);
      REQUIRE(rows.recv_rows == static_cast<int64_t>(x.rows[r].size()));
      REQUIRE(rows.recv_rows <= worst.recv_rows);
      REQUIRE(rows.send_rows <= worst.send_rows);
      if (!p.capacity_mode) {
        int64_t remote = 0;
        for (int peer = 0; peer < n; ++peer)
          if (peer != r) remote += x.sent[r][peer];
        REQUIRE(rows.send_rows == remote);
        REQUIRE(moekit::ep::check_host_layout(d, sim.signature, r, p.num_tokens[r], hl_of(r)) ==
                MOEKIT_STATUS_SUCCESS);
      }
    }
    for (int c = 0; c < C; ++c) {
      // transfers[r][peer] of this chunk.
      std::vector<std::map<int, moekit::ep::Transfer>> transfers(n);
      for (int r = 0; r < n; ++r) {
        const moekit::ep::RowSpaces rows = moekit::ep::row_spaces(d, hl_of(r));
        int last_peer = -1;
        std::vector<std::pair<int64_t, int64_t>> send_ranges, recv_ranges;
        for (const moekit::ep::Transfer& t : moekit::ep::chunk_transfers(d, r, hl_of(r), c)) {
          REQUIRE(t.peer != r);
          REQUIRE(t.peer > last_peer);
          last_peer = t.peer;
          REQUIRE((t.send_count > 0 || t.recv_count > 0));
          REQUIRE((t.send_row >= 0 && t.send_row + t.send_count <= rows.send_rows));
          REQUIRE((t.recv_row >= 0 && t.recv_row + t.recv_count <= rows.recv_rows));
          send_ranges.push_back({t.send_row, t.send_row + t.send_count});
          recv_ranges.push_back({t.recv_row, t.recv_row + t.recv_count});
          transfers[r][t.peer] = t;
        }
        for (auto* ranges : {&send_ranges, &recv_ranges}) {
          std::sort(ranges->begin(), ranges->end());
          for (size_t i = 1; i < ranges->size(); ++i)
            REQUIRE((*ranges)[i].first >= (*ranges)[i - 1].second);
        }
      }
      for (int a = 0; a < n; ++a)
        for (int b = 0; b < n; ++b) {
          if (a == b) continue;
          const bool ab = transfers[a].count(b) > 0, ba = transfers[b].count(a) > 0;
          REQUIRE(ab == ba);
          if (!ab) continue;
          REQUIRE(transfers[a][b].send_count == transfers[b][a].recv_count);
          REQUIRE(transfers[a][b].recv_count == transfers[b][a].send_count);
        }
      // The k-th token of chunk c of source s for destination a (k < count) arrives at row
      // recv_row + k of a: exactly the reference's row.
      for (int src = 0; src < n; ++src) {
        const int64_t T = p.num_tokens[src], L = (T + C - 1) / C;
        for (int dst = 0; dst < n; ++dst) {
          if (dst == src) continue;
          int64_t k = 0;
          for (int64_t t = std::min(c * L, T); t < std::min((c + 1) * L, T); ++t) {
            const auto& ds = x.dests[src][t];
            const auto it = std::find(ds.begin(), ds.end(), dst);
            if (it == ds.end()) continue;
            const int64_t want = x.row_at[src][t][static_cast<size_t>(it - ds.begin())];
            if (want >= 0) {
              REQUIRE(transfers[dst].count(src) > 0);
              const moekit::ep::Transfer& t_in = transfers[dst][src];
              REQUIRE(k < t_in.recv_count);
              REQUIRE(t_in.recv_row + k == want);
            }
            ++k;
          }
        }
      }
    }
  }
}

// ---- the NCCL script of every call ----------------------------------------------------------

using moekit::ep::Call;
using moekit::ep::call_payloads;
using moekit::ep::P2pOp;
using moekit::ep::Payload;
using moekit::ep::Payloads;
using moekit::test::ep::all_scripts;
using moekit::test::ep::check_rank_calls;
using moekit::test::ep::check_scripts;
using moekit::test::ep::ScriptedCall;

// Every call once, each rank passing the pointers a real caller has: NULL where its T or its
// received rows are 0 (dispatch backward with and without weight gradients).
std::vector<ScriptedCall> every_call(int64_t T, int64_t R) {
  return {{Call::kLayout, call_payloads(Call::kLayout, false, false)},
          {Call::kDispatch, call_payloads(Call::kDispatch, false, false)},
          {Call::kCombine, call_payloads(Call::kCombine, false, false)},
          {Call::kDispatchBackward, call_payloads(Call::kDispatchBackward, T > 0, R > 0)},
          {Call::kDispatchBackward, call_payloads(Call::kDispatchBackward, false, false)},
          {Call::kCombineBackward, call_payloads(Call::kCombineBackward, false, false)}};
}

TEST_CASE("ep protocol: every rank issues the same NCCL groups, both ends of every pair agree",
          "[ep][protocol]") {
  auto rng = moekit::test::make_rng(0x5c41);
  for (int trial = 0; trial < 60; ++trial) {
    RoutingShape s;
    s.num_ranks = std::vector<int>{2, 3, 4, 8, 1, 5}[trial % 6];
    s.num_experts = s.num_ranks * (1 + trial % 5);
    s.top_k = 1 + trial % std::min(s.num_experts, 8);
    s.num_chunks = 1 + (trial / 2) % 5;
    s.capacity_mode = trial % 2 == 1;
    for (int r = 0; r < s.num_ranks; ++r)  // ranks with no tokens in a third of the trials
      s.num_tokens.push_back(r % 2 == 1 && trial % 3 == 0 ? 0 : 1 + (trial * 13 + r * 7) % 250);
    s.capacity = s.capacity_mode ? 1 + trial * 7 % 90 : 0;
    s.invalid_fraction = 0.02;
    s.local_only_fraction = 0.3;
    s.mask_fraction = trial % 4 == 0 ? 0.2 : 0.0;
    const auto routing = make_routing(s, rng);
    const EpProblem& p = routing.problem;
    const EpExchange x = moekit::ref::ep_exchange(p);
    const SimulatedRanks sim = simulate(p, 8 + trial % 3);
    const moekit::ep::Dims& d = sim.dims;
    const int n = p.num_ranks;
    INFO("trial " << trial << " n " << n << " C " << d.num_chunks
                  << (p.capacity_mode ? " capacity" : " exact"));
    std::vector<std::vector<ScriptedCall>> calls;
    for (int r = 0; r < n; ++r)
      calls.push_back(every_call(p.num_tokens[r], static_cast<int64_t>(x.rows[r].size())));
    const auto scripts = all_scripts(d, sim.host_layouts, calls);
    const std::string why = check_scripts(scripts);
    INFO(why);
    REQUIRE(why.empty());
    // Group counts, and every operation inside its row space with the bytes of its rows.
    for (int r = 0; r < n; ++r) {
      const int64_t* hl = p.capacity_mode ? nullptr : sim.host_layouts[r].data();
      const moekit::ep::RowSpaces rows = moekit::ep::row_spaces(d, hl);
      REQUIRE(scripts[r].size() ==
              static_cast<size_t>((p.capacity_mode ? 0 : 1) + 5 * d.num_chunks));
      for (const auto& g : scripts[r])
        for (const P2pOp& op : g.ops) {
          REQUIRE(op.peer >= 0);
          REQUIRE(op.peer < n);
          REQUIRE(op.rows > 0);
          REQUIRE(op.bytes == op.rows * moekit::ep::payload_row_bytes(d, g.call, op.payload));
          if (op.payload == Payload::kCounts) {
            REQUIRE(g.call == Call::kLayout);
            continue;
          }
          REQUIRE(op.peer != r);  // rows that stay on this rank are local copies, never NCCL
          const int64_t space = op.recv_space ? rows.recv_rows : rows.send_rows;
          REQUIRE((op.first_row >= 0 && op.first_row + op.rows <= space));
          // Dispatch moves metadata on every rank, whatever its T; the other calls never do.
          if (op.payload == Payload::kMeta) REQUIRE(g.call == Call::kDispatch);
          if (op.payload == Payload::kWeights) REQUIRE(g.call == Call::kDispatchBackward);
        }
    }
  }
}

// The GPU suite's first case, made as test_ep_gpu.cpp's make_global makes it: ep = 2 (and 4), 8
// experts per rank, K = 4, H = 64 bf16, exact mode, one chunk, tokens {37, 0, 300, 5} cycled over
// the ranks (rank 1 has none), 30 % local-only tokens, 10 % masked, 5 % invalid ids, 10 %
// duplicates, drawn from make_rng(salt * 1000003 + n): with salt 1 and the GPU run's
// MOEKIT_TEST_SEED this is exactly the problem the GPU suite ran.
struct FirstGpuCase {
  EpProblem problem;
  EpExchange x;
  SimulatedRanks sim;
};

FirstGpuCase first_gpu_case(int n, uint64_t salt) {
  RoutingShape s;
  s.num_ranks = n;
  s.num_experts = 8 * n;
  s.top_k = 4;
  s.num_chunks = 1;
  const std::vector<int64_t> tokens{37, 0, 300, 5};
  for (int r = 0; r < n; ++r) s.num_tokens.push_back(tokens[r % tokens.size()]);
  s.capacity = 0;
  s.local_only_fraction = 0.3;
  s.mask_fraction = 0.1;
  s.invalid_fraction = 0.05;
  s.duplicate_fraction = 0.1;
  auto rng = moekit::test::make_rng(salt * 1000003 + static_cast<uint64_t>(n));
  FirstGpuCase c;
  c.problem = make_routing(s, rng).problem;
  c.x = moekit::ref::ep_exchange(c.problem);
  c.sim = simulate(c.problem, 64);
  return c;
}

TEST_CASE("ep protocol: the GPU suite's first case, call by call, on every rank",
          "[ep][protocol]") {
  for (int n : {2, 4}) {
    for (uint64_t salt = 1; salt <= 8; ++salt) {  // 1: the GPU suite's own salt
      const FirstGpuCase c = first_gpu_case(n, salt);
      INFO("ep = " << n << ", salt " << salt);
      std::vector<std::vector<ScriptedCall>> calls;
      for (int r = 0; r < n; ++r)
        calls.push_back(check_rank_calls(c.problem.num_tokens[r],
                                         static_cast<int64_t>(c.x.rows[r].size()), true));
      const auto scripts = all_scripts(c.sim.dims, c.sim.host_layouts, calls);
      const std::string why = check_scripts(scripts);
      INFO(why);
      REQUIRE(why.empty());
      // Rank 1 (no tokens) still receives rank 0's rows with their ids and weights.
      REQUIRE(c.x.sent[0][1] > 0);
      const auto& dispatch = scripts[1][1];
      REQUIRE(dispatch.call == Call::kDispatch);
      int64_t meta_bytes = 0;
      for (const P2pOp& op : dispatch.ops)
        if (!op.send && op.peer == 0 && op.payload == Payload::kMeta) meta_bytes += op.bytes;
      REQUIRE(meta_bytes == c.x.sent[0][1] * (2 * 4 + 1) * 4);
    }
  }
}

TEST_CASE("ep protocol: the script check catches both hangs the GPU suite met",
          "[ep][protocol]") {
  const FirstGpuCase c = first_gpu_case(2, 1);
  const EpProblem& p = c.problem;
  REQUIRE(p.num_tokens[1] == 0);
  REQUIRE(c.x.sent[0][1] > 0);
  std::vector<std::vector<ScriptedCall>> calls;
  for (int r = 0; r < 2; ++r)
    calls.push_back(
        check_rank_calls(p.num_tokens[r], static_cast<int64_t>(c.x.rows[r].size()), true));
  auto broken = calls;
  // The hang of run 5: dispatch moved metadata only where indices != NULL, so rank 1 (T = 0)
  // posted no receive for the ids and weights rank 0 sent.
  for (int r = 0; r < 2; ++r)
    for (ScriptedCall& call : broken[r])
      if (call.call == Call::kDispatch) call.payloads.meta = p.num_tokens[r] > 0;
  std::string why = check_scripts(all_scripts(c.sim.dims, c.sim.host_layouts, broken));
  INFO(why);
  CHECK(why.find("moekit_ep_dispatch") != std::string::npos);
  CHECK(why.find("rank 0 sends rank 1 [rows") != std::string::npos);
  CHECK(why.find("ids+weights") != std::string::npos);
  // The first 4-GPU hang (fixed in d8451b7): weight gradients moved only where grad_weights was
  // given, which a rank with T = 0 cannot do.
  broken = calls;
  for (int r = 0; r < 2; ++r)
    for (ScriptedCall& call : broken[r])
      if (call.call == Call::kDispatchBackward)
        call.payloads.weights = p.num_tokens[r] > 0;
  why = check_scripts(all_scripts(c.sim.dims, c.sim.host_layouts, broken));
  INFO(why);
  CHECK(why.find("moekit_ep_dispatch_backward") != std::string::npos);
  CHECK(why.find("weight grads") != std::string::npos);
  // Ranks that disagree on the sequence of calls (one skips a combine).
  broken = calls;
  broken[1].erase(broken[1].begin() + 2);
  why = check_scripts(all_scripts(c.sim.dims, c.sim.host_layouts, broken));
  INFO(why);
  CHECK(why.find("moekit_ep_combine") != std::string::npos);
}

TEST_CASE("ep protocol: a host layout from another configuration, rank or T is refused",
          "[ep][protocol]") {
  auto rng = moekit::test::make_rng(0x51);
  RoutingShape s;
  s.num_ranks = 3;
  s.num_experts = 6;
  s.top_k = 2;
  s.num_chunks = 2;
  s.num_tokens = {5, 7, 0};
  const auto routing = make_routing(s, rng);
  const SimulatedRanks sim = simulate(routing.problem, 8);
  const int64_t* hl = sim.host_layouts[1].data();
  REQUIRE(moekit::ep::check_host_layout(sim.dims, sim.signature, 1, 7, hl) ==
          MOEKIT_STATUS_SUCCESS);
  REQUIRE_INTERNAL_STATUS(moekit::ep::check_host_layout(sim.dims, sim.signature, 1, 6, hl),
                          MOEKIT_STATUS_INVALID_ARGUMENT, "num_tokens = 6");
  REQUIRE_INTERNAL_STATUS(moekit::ep::check_host_layout(sim.dims, sim.signature, 0, 7, hl),
                          MOEKIT_STATUS_INVALID_ARGUMENT, "rank 1");
  REQUIRE_INTERNAL_STATUS(moekit::ep::check_host_layout(sim.dims, sim.signature + 1, 1, 7, hl),
                          MOEKIT_STATUS_INVALID_ARGUMENT, "host_layout");
  std::vector<int64_t> garbage(sim.host_layouts[1].size(), 0);
  REQUIRE_INTERNAL_STATUS(
      moekit::ep::check_host_layout(sim.dims, sim.signature, 1, 7, garbage.data()),
      MOEKIT_STATUS_INVALID_ARGUMENT, "host_layout");
}

// ---- configuration and sizes -----------------------------------------------------------------

TEST_CASE("ep config: defaults, every bad field named with its value", "[ep][config]") {
  moekit_ep_config_t c;
  REQUIRE(moekit_ep_config_init(&c, sizeof(c)) == MOEKIT_STATUS_SUCCESS);
  CHECK(c.struct_size == sizeof(c));
  CHECK(c.dtype == MOEKIT_DTYPE_BF16);
  CHECK(c.combine_dtype == -1);
  CHECK(c.mode == MOEKIT_EP_MODE_EXACT);
  CHECK(c.num_chunks == 1);
  REQUIRE_STATUS(moekit_ep_config_check(&c), MOEKIT_STATUS_INVALID_ARGUMENT, "num_ranks = 0");
  REQUIRE_STATUS(moekit_ep_config_init(nullptr, sizeof(c)), MOEKIT_STATUS_INVALID_ARGUMENT,
                 "config is NULL");
  REQUIRE_STATUS(moekit_ep_config_init(&c, 8), MOEKIT_STATUS_INVALID_ARGUMENT, "struct_size = 8");
  REQUIRE_STATUS(moekit_ep_config_check(nullptr), MOEKIT_STATUS_INVALID_ARGUMENT, "config");

  const moekit_ep_config_t good = base_config(4, 32, 8, 64, 100, MOEKIT_EP_MODE_EXACT, 2);
  REQUIRE(moekit_ep_config_check(&good) == MOEKIT_STATUS_SUCCESS);
  struct Bad {
    void (*mutate)(moekit_ep_config_t&);
    const char* needle;
  };
  const Bad bad[] = {
      {[](moekit_ep_config_t& x) { x.num_ranks = 0; }, "num_ranks = 0"},
      {[](moekit_ep_config_t& x) { x.num_ranks = MOEKIT_EP_MAX_RANKS + 1; }, "num_ranks = 1025"},
      {[](moekit_ep_config_t& x) { x.num_experts = 30; }, "num_experts = 30"},
      {[](moekit_ep_config_t& x) { x.num_experts = 0; }, "num_experts = 0"},
      {[](moekit_ep_config_t& x) { x.top_k = 0; }, "top_k = 0"},
      {[](moekit_ep_config_t& x) { x.top_k = 33; }, "top_k = 33"},
      {[](moekit_ep_config_t& x) {
         x.num_experts = 4;
         x.top_k = 5;
       },
       "top_k = 5 exceeds num_experts = 4"},
      {[](moekit_ep_config_t& x) { x.dtype = 7; }, "dtype = 7"},
      {[](moekit_ep_config_t& x) { x.combine_dtype = -2; }, "combine_dtype = -2"},
      {[](moekit_ep_config_t& x) { x.mode = 2; }, "mode = 2"},
      {[](moekit_ep_config_t& x) { x.num_chunks = 0; }, "num_chunks = 0"},
      {[](moekit_ep_config_t& x) { x.num_chunks = 17; }, "num_chunks = 17"},
      {[](moekit_ep_config_t& x) { x.hidden = 0; }, "hidden = 0"},
      {[](moekit_ep_config_t& x) { x.max_tokens = -1; }, "max_tokens = -1"},
      {[](moekit_ep_config_t& x) { x.max_tokens = int64_t(1) << 31; }, "max_tokens = 2147483648"},
      {[](moekit_ep_config_t& x) { x.max_tokens = 1 << 30; }, "times num_ranks"},
      {[](moekit_ep_config_t& x) { x.capacity = -5; }, "capacity = -5"},
      {[](moekit_ep_config_t& x) {
         x.mode = MOEKIT_EP_MODE_CAPACITY;
         x.capacity = 1 << 30;
       },
       "received rows"},
  };
  for (const Bad& b : bad) {
    moekit_ep_config_t x = good;
    b.mutate(x);
    INFO("expecting a message with '" << b.needle << "'");
    REQUIRE_STATUS(moekit_ep_config_check(&x), MOEKIT_STATUS_INVALID_ARGUMENT, b.needle,
                   "moekit_ep_config_check");
  }
}

TEST_CASE("ep config: an older, smaller struct is read with defaults for the rest",
          "[ep][config]") {
  moekit_ep_config_t c = base_config(2, 4, 2, 16, 10, MOEKIT_EP_MODE_EXACT, 3);
  // The first release is the whole struct today; a struct_size past it reads only sizeof.
  c.struct_size = sizeof(c) + 64;
  CHECK(moekit_ep_config_check(&c) == MOEKIT_STATUS_SUCCESS);
}

TEST_CASE("ep sizes: layout, host layout, receive rows and workspace", "[ep][sizes]") {
  const moekit_ep_config_t exact = base_config(4, 64, 8, 7168, 4096, MOEKIT_EP_MODE_EXACT, 4);
  moekit_ep_config_t capacity = exact;
  capacity.mode = MOEKIT_EP_MODE_CAPACITY;
  capacity.capacity = 1000;
  size_t layout_bytes = 0, host_count = 0;
  REQUIRE(moekit_ep_layout_size(&exact, &layout_bytes, &host_count) == MOEKIT_STATUS_SUCCESS);
  // route_dest and route_slot alone: 2 * T_max * min(K, n) int32.
  CHECK(layout_bytes >= 2 * 4096 * 4 * sizeof(int32_t));
  CHECK(host_count == 8 + 2 * 4 * 4);
  REQUIRE(moekit_ep_layout_size(&capacity, nullptr, &host_count) == MOEKIT_STATUS_SUCCESS);
  CHECK(host_count == 0);

  int64_t rows = 0;
  REQUIRE(moekit_ep_max_recv_rows(&exact, &rows) == MOEKIT_STATUS_SUCCESS);
  CHECK(rows == 4 * 4096);
  REQUIRE(moekit_ep_max_recv_rows(&capacity, &rows) == MOEKIT_STATUS_SUCCESS);
  CHECK(rows == 4 * 4 * 250);
  capacity.capacity = 1001;  // ceil(1001 / 4) = 251 rows per (source, chunk)
  REQUIRE(moekit_ep_max_recv_rows(&capacity, &rows) == MOEKIT_STATUS_SUCCESS);
  CHECK(rows == 4 * 4 * 251);
  capacity.capacity = 0;  // = max_tokens
  REQUIRE(moekit_ep_max_recv_rows(&capacity, &rows) == MOEKIT_STATUS_SUCCESS);
  CHECK(rows == 4 * 4096);

  // Workspace: what the carving needs for the rows of a layout, within the alignment padding.
  auto expect_workspace = [](const moekit_ep_config_t& c, int64_t S, int64_t R) {
    const int64_t elem = c.dtype == MOEKIT_DTYPE_F32 ? 4 : 2;
    const int64_t celem = (c.combine_dtype < 0 ? elem : (c.combine_dtype == MOEKIT_DTYPE_F32 ? 4 : 2));
    const int64_t M = 2 * c.top_k + 1;
    const int64_t dispatch = S * c.hidden * elem + S * M * 4 + R * M * 4;
    const int64_t combine = S * c.hidden * std::max(elem, celem) + S * c.top_k * 4;
    return std::max(dispatch, combine);
  };
  size_t ws = 0;
  REQUIRE(moekit_ep_workspace_size(&exact, nullptr, &ws) == MOEKIT_STATUS_SUCCESS);
  int64_t want = expect_workspace(exact, 4096 * 3, 4 * 4096);
  CHECK(static_cast<int64_t>(ws) >= want);
  CHECK(static_cast<int64_t>(ws) <= want + 3 * 256);
  moekit_ep_config_t fp32_partials = exact;
  fp32_partials.combine_dtype = MOEKIT_DTYPE_F32;
  size_t ws32 = 0;
  REQUIRE(moekit_ep_workspace_size(&fp32_partials, nullptr, &ws32) == MOEKIT_STATUS_SUCCESS);
  CHECK(ws32 > ws);
  capacity.capacity = 1000;
  REQUIRE(moekit_ep_workspace_size(&capacity, nullptr, &ws) == MOEKIT_STATUS_SUCCESS);
  want = expect_workspace(capacity, 3 * 4 * 250, 4 * 4 * 250);
  CHECK(static_cast<int64_t>(ws) >= want);
  CHECK(static_cast<int64_t>(ws) <= want + 3 * 256);

  // With a filled host layout the workspace is the exact one of that layout.
  auto rng = moekit::test::make_rng(0x77);
  RoutingShape s;
  s.num_ranks = 4;
  s.num_experts = 64;
  s.top_k = 8;
  s.num_chunks = 4;
  s.num_tokens = {300, 0, 17, 4096};
  const auto routing = make_routing(s, rng);
  const SimulatedRanks sim = simulate(routing.problem, 7168);
  for (int r = 0; r < 4; ++r) {
    const int64_t* hl = sim.host_layouts[r].data();
    REQUIRE(moekit_ep_workspace_size(&sim.config, hl, &ws) == MOEKIT_STATUS_SUCCESS);
    want = expect_workspace(sim.config, hl[moekit::ep::kHlSendRows], hl[moekit::ep::kHlRecvRows]);
    CHECK(static_cast<int64_t>(ws) >= want);
    CHECK(static_cast<int64_t>(ws) <= want + 3 * 256);
  }
  std::vector<int64_t> garbage(host_count + 100, 3);
  REQUIRE_STATUS(moekit_ep_workspace_size(&sim.config, garbage.data(), &ws),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "host_layout");
  REQUIRE_STATUS(moekit_ep_workspace_size(&capacity, sim.host_layouts[0].data(), &ws),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "host_layout", "capacity mode");
  REQUIRE_STATUS(moekit_ep_workspace_size(&exact, nullptr, nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "workspace_bytes is NULL");
  REQUIRE_STATUS(moekit_ep_max_recv_rows(&exact, nullptr), MOEKIT_STATUS_INVALID_ARGUMENT,
                 "rows is NULL");
  moekit_ep_config_t broken = exact;
  broken.top_k = 0;
  REQUIRE_STATUS(moekit_ep_layout_size(&broken, &layout_bytes, nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "top_k = 0");
}

// ---- the C API up to the device --------------------------------------------------------------

TEST_CASE("ep api: NCCL availability, handle creation and NULL handles", "[ep][api]") {
  int32_t version = 0;
  const moekit_status_t vs = moekit_ep_nccl_version(&version);
  if (vs == MOEKIT_STATUS_SUCCESS) {
    CHECK(version >= 22800);
  } else {
    REQUIRE_STATUS(vs, MOEKIT_STATUS_NOT_AVAILABLE, "without NCCL");
  }
  REQUIRE_STATUS(moekit_ep_nccl_version(nullptr), MOEKIT_STATUS_INVALID_ARGUMENT,
                 "version is NULL");

  const moekit_ep_config_t c = base_config(2, 8, 2, 64, 16, MOEKIT_EP_MODE_EXACT, 2);
  moekit_ep_handle_t h = nullptr;
  REQUIRE_STATUS(moekit_ep_create(&c, nullptr, &h), MOEKIT_STATUS_INVALID_ARGUMENT,
                 "nccl_comm is NULL", "moekit_ep_create");
  CHECK(h == nullptr);
  int dummy_comm = 0;
  REQUIRE_STATUS(moekit_ep_create(&c, &dummy_comm, nullptr), MOEKIT_STATUS_INVALID_ARGUMENT,
                 "handle is NULL");
  REQUIRE_STATUS(moekit_ep_create(nullptr, &dummy_comm, &h), MOEKIT_STATUS_INVALID_ARGUMENT,
                 "config is NULL");
  moekit_ep_config_t bad = c;
  bad.num_experts = 7;
  REQUIRE_STATUS(moekit_ep_create(&bad, &dummy_comm, &h), MOEKIT_STATUS_INVALID_ARGUMENT,
                 "num_experts = 7");
  CHECK(moekit_ep_destroy(nullptr) == MOEKIT_STATUS_SUCCESS);

  int32_t idx[4] = {0, 1, 2, 3};
  int64_t hl[64] = {};
  REQUIRE_STATUS(moekit_ep_layout(nullptr, 0, idx, nullptr, hl, 256, hl, nullptr, nullptr,
                                  nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "handle is NULL", "moekit_ep_layout");
  REQUIRE_STATUS(moekit_ep_dispatch(nullptr, 0, hl, hl, nullptr, nullptr, nullptr, nullptr,
                                    nullptr, nullptr, nullptr, nullptr, nullptr, 0, nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "handle is NULL", "moekit_ep_dispatch");
  REQUIRE_STATUS(moekit_ep_combine(nullptr, 0, hl, hl, nullptr, nullptr, nullptr, 0, nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "handle is NULL", "moekit_ep_combine");
  REQUIRE_STATUS(moekit_ep_dispatch_backward(nullptr, 0, hl, hl, nullptr, nullptr, nullptr,
                                             nullptr, nullptr, nullptr, 0, nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "handle is NULL");
  REQUIRE_STATUS(moekit_ep_combine_backward(nullptr, 0, hl, hl, nullptr, nullptr, nullptr, 0,
                                            nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "handle is NULL");
  REQUIRE_STATUS(moekit_ep_layout_counts(nullptr, hl, nullptr, nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "handle is NULL");

  int32_t load[4] = {};
  float sums[4] = {};
  size_t bytes = 0;
  REQUIRE_STATUS(moekit_ep_allreduce_expert_load(nullptr, 4, load, nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "nccl_comm is NULL");
  REQUIRE_STATUS(moekit_ep_allreduce_expert_load(&dummy_comm, 0, load, nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "num_experts = 0");
  REQUIRE_STATUS(moekit_ep_allreduce_expert_load(&dummy_comm, 4, nullptr, nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "expert_load is NULL");
  REQUIRE_STATUS(moekit_ep_aux_stats_workspace_size(nullptr, 4, &bytes),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "nccl_comm is NULL");
  REQUIRE_STATUS(moekit_ep_aux_stats_workspace_size(&dummy_comm, 4, nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "workspace_bytes is NULL");
  REQUIRE_STATUS(moekit_ep_allreduce_aux_stats(&dummy_comm, 4, nullptr, nullptr, nullptr, 0,
                                               nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "both NULL");
  REQUIRE_STATUS(moekit_ep_allreduce_aux_stats(nullptr, 4, sums, nullptr, nullptr, 0, nullptr),
                 MOEKIT_STATUS_INVALID_ARGUMENT, "nccl_comm is NULL");
}

// A handle as moekit_ep_create would leave it, but without a communicator: the argument checks
// run before anything touches NCCL or the device, so each can be exercised here. A call whose
// arguments all pass reaches the device check and stops there (no device, or no NCCL).
struct FakeHandle {
  moekit_ep handle;
  explicit FakeHandle(const moekit_ep_config_t& c, int rank) {
    handle.config = c;
    handle.dims = moekit::ep::dims_of(c);
    handle.signature = moekit::ep::config_signature(c);
    handle.rank = rank;
    handle.device = 12345;  // no thread's current device
  }
};

bool reached_device_check(moekit_status_t s) {
  return s == MOEKIT_STATUS_NOT_AVAILABLE || s == MOEKIT_STATUS_CUDA_ERROR ||
         (s == MOEKIT_STATUS_INVALID_ARGUMENT && message_has("current device"));
}

struct alignas(256) Aligned {
  unsigned char bytes[1 << 16];
};

TEST_CASE("ep api: every argument of layout, dispatch, combine and the backwards is checked",
          "[ep][api]") {
  auto rng = moekit::test::make_rng(0x3c);
  RoutingShape s;
  s.num_ranks = 2;
  s.num_experts = 8;
  s.top_k = 3;
  s.num_chunks = 2;
  s.num_tokens = {6, 9};
  const auto routing = make_routing(s, rng);
  const SimulatedRanks sim = simulate(routing.problem, 32);
  FakeHandle fake(sim.config, 1);
  moekit_ep_handle_t h = &fake.handle;
  const int64_t* hl = sim.host_layouts[1].data();
  const int64_t T = 9;
  const int64_t R = hl[moekit::ep::kHlRecvRows];
  REQUIRE(R > 0);

  static Aligned layout_buffer, workspace_buffer;
  size_t layout_bytes = 0;
  REQUIRE(moekit_ep_layout_size(&sim.config, &layout_bytes, nullptr) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(layout_bytes <= sizeof(layout_buffer.bytes));
  void* layout = layout_buffer.bytes;
  size_t ws_bytes = 0;
  REQUIRE(moekit_ep_workspace_size(&sim.config, hl, &ws_bytes) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(ws_bytes + 256 <= sizeof(workspace_buffer.bytes));
  void* ws = workspace_buffer.bytes;
  // Host stand-ins for device pointers: never dereferenced before the device check.
  std::vector<uint8_t> host_rows(static_cast<size_t>(4 * 32 * (T + R)));
  void* rows = host_rows.data();
  std::vector<int32_t> ids(static_cast<size_t>(3 * (T + R)));
  std::vector<float> ws_f(static_cast<size_t>(3 * (T + R)));
  int64_t host_layout[64] = {};

  SECTION("layout") {
    REQUIRE_STATUS(moekit_ep_layout(h, -1, ids.data(), nullptr, layout, layout_bytes, host_layout,
                                    nullptr, nullptr, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "num_tokens = -1");
    REQUIRE_STATUS(moekit_ep_layout(h, 10, ids.data(), nullptr, layout, layout_bytes, host_layout,
                                    nullptr, nullptr, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "num_tokens = 10", "max_tokens = 9");
    REQUIRE_STATUS(moekit_ep_layout(h, 3, nullptr, nullptr, layout, layout_bytes, host_layout,
                                    nullptr, nullptr, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "indices is NULL");
    REQUIRE_STATUS(moekit_ep_layout(h, 3, ids.data(), nullptr, nullptr, layout_bytes, host_layout,
                                    nullptr, nullptr, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "layout is NULL");
    REQUIRE_STATUS(moekit_ep_layout(h, 3, ids.data(), nullptr, layout_buffer.bytes + 4,
                                    layout_bytes, host_layout, nullptr, nullptr, nullptr),
                   MOEKIT_STATUS_MISALIGNED, "layout");
    REQUIRE_STATUS(moekit_ep_layout(h, 3, ids.data(), nullptr, layout, layout_bytes - 1,
                                    host_layout, nullptr, nullptr, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "layout_bytes");
    REQUIRE_STATUS(moekit_ep_layout(h, 3, ids.data(), nullptr, layout, layout_bytes, nullptr,
                                    nullptr, nullptr, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "host_layout is NULL");
    CHECK(reached_device_check(moekit_ep_layout(h, 3, ids.data(), nullptr, layout, layout_bytes,
                                                host_layout, nullptr, nullptr, nullptr)));
    CHECK(reached_device_check(moekit_ep_layout(h, 0, nullptr, nullptr, layout, layout_bytes,
                                                host_layout, nullptr, nullptr, nullptr)));
  }
  SECTION("dispatch") {
    auto call = [&](int64_t t, const void* lay, const int64_t* hlay, const void* x,
                    const int32_t* idx, const float* w, void* rx, int32_t* ri, float* rw,
                    void* work, size_t work_bytes) {
      return moekit_ep_dispatch(h, t, lay, hlay, x, idx, w, rx, ri, rw, nullptr, nullptr, work,
                                work_bytes, nullptr);
    };
    REQUIRE_STATUS(call(T, layout, hl, rows, ids.data(), ws_f.data(), rows, ids.data(),
                        ws_f.data(), ws, ws_bytes - 1),
                   MOEKIT_STATUS_WORKSPACE_TOO_SMALL, "workspace_bytes");
    REQUIRE_STATUS(call(T, layout, hl, rows, ids.data(), ws_f.data(), rows, ids.data(),
                        ws_f.data(), workspace_buffer.bytes + 1, ws_bytes),
                   MOEKIT_STATUS_MISALIGNED, "workspace");
    REQUIRE_STATUS(call(T, layout, hl, rows, ids.data(), ws_f.data(), rows, ids.data(),
                        ws_f.data(), nullptr, ws_bytes),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "workspace is NULL");
    REQUIRE_STATUS(call(T - 1, layout, hl, rows, ids.data(), ws_f.data(), rows, ids.data(),
                        ws_f.data(), ws, ws_bytes),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "num_tokens = 8");
    REQUIRE_STATUS(call(T, layout, nullptr, rows, ids.data(), ws_f.data(), rows, ids.data(),
                        ws_f.data(), ws, ws_bytes),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "host_layout is NULL");
    REQUIRE_STATUS(call(T, layout, sim.host_layouts[0].data(), rows, ids.data(), ws_f.data(),
                        rows, ids.data(), ws_f.data(), ws, ws_bytes),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "rank 0");
    REQUIRE_STATUS(call(T, nullptr, hl, rows, ids.data(), ws_f.data(), rows, ids.data(),
                        ws_f.data(), ws, ws_bytes),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "layout is NULL");
    REQUIRE_STATUS(call(T, layout, hl, nullptr, ids.data(), ws_f.data(), rows, ids.data(),
                        ws_f.data(), ws, ws_bytes),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "x is NULL");
    REQUIRE_STATUS(call(T, layout, hl, rows, nullptr, ws_f.data(), rows, ids.data(), ws_f.data(),
                        ws, ws_bytes),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "indices is NULL");
    REQUIRE_STATUS(call(T, layout, hl, rows, ids.data(), nullptr, rows, ids.data(), ws_f.data(),
                        ws, ws_bytes),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "weights is NULL");
    REQUIRE_STATUS(call(T, layout, hl, rows, ids.data(), ws_f.data(), nullptr, ids.data(),
                        ws_f.data(), ws, ws_bytes),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "recv_x is NULL");
    REQUIRE_STATUS(call(T, layout, hl, rows, ids.data(), ws_f.data(), rows, nullptr, ws_f.data(),
                        ws, ws_bytes),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "recv_indices is NULL");
    REQUIRE_STATUS(call(T, layout, hl, rows, ids.data(), ws_f.data(), rows, ids.data(), nullptr,
                        ws, ws_bytes),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "recv_weights is NULL");
    CHECK(reached_device_check(call(T, layout, hl, rows, ids.data(), ws_f.data(), rows,
                                    ids.data(), ws_f.data(), ws, ws_bytes)));
  }
  SECTION("combine and the backwards") {
    REQUIRE_STATUS(moekit_ep_combine(h, T, layout, hl, nullptr, rows, ws, ws_bytes, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "partials is NULL");
    REQUIRE_STATUS(moekit_ep_combine(h, T, layout, hl, rows, nullptr, ws, ws_bytes, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "y is NULL");
    CHECK(reached_device_check(
        moekit_ep_combine(h, T, layout, hl, rows, rows, ws, ws_bytes, nullptr)));
    REQUIRE_STATUS(moekit_ep_dispatch_backward(h, T, layout, hl, ids.data(), nullptr, nullptr,
                                               rows, nullptr, ws, ws_bytes, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "grad_recv_x is NULL");
    REQUIRE_STATUS(moekit_ep_dispatch_backward(h, T, layout, hl, ids.data(), rows, ws_f.data(),
                                               rows, nullptr, ws, ws_bytes, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "grad_weights is NULL");
    REQUIRE_STATUS(moekit_ep_dispatch_backward(h, T, layout, hl, ids.data(), rows, nullptr, rows,
                                               ws_f.data(), ws, ws_bytes, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "grad_recv_weights is NULL");
    REQUIRE_STATUS(moekit_ep_dispatch_backward(h, T, layout, hl, nullptr, rows, ws_f.data(), rows,
                                               ws_f.data(), ws, ws_bytes, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "indices is NULL");
    CHECK(reached_device_check(moekit_ep_dispatch_backward(
        h, T, layout, hl, ids.data(), rows, ws_f.data(), rows, ws_f.data(), ws, ws_bytes, nullptr)));
    REQUIRE_STATUS(moekit_ep_combine_backward(h, T, layout, hl, nullptr, rows, ws, ws_bytes,
                                              nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "grad_y is NULL");
    REQUIRE_STATUS(moekit_ep_combine_backward(h, T, layout, hl, rows, nullptr, ws, ws_bytes,
                                              nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "grad_partials is NULL");
    CHECK(reached_device_check(
        moekit_ep_combine_backward(h, T, layout, hl, rows, rows, ws, ws_bytes, nullptr)));
  }
  SECTION("layout counts") {
    std::vector<int64_t> send(2), recv(2);
    REQUIRE(moekit_ep_layout_counts(h, hl, send.data(), recv.data()) == MOEKIT_STATUS_SUCCESS);
    const EpExchange x = moekit::ref::ep_exchange(routing.problem);
    CHECK(send == x.sent[1]);
    CHECK(recv == std::vector<int64_t>{x.sent[0][1], x.sent[1][1]});
    std::vector<int64_t> garbage(sim.host_layouts[1].size(), 0);
    REQUIRE_STATUS(moekit_ep_layout_counts(h, garbage.data(), send.data(), nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "host_layout");
  }
  SECTION("capacity mode takes no host layout") {
    moekit_ep_config_t cc = sim.config;
    cc.mode = MOEKIT_EP_MODE_CAPACITY;
    FakeHandle fake_cap(cc, 0);
    moekit_ep_handle_t hc = &fake_cap.handle;
    REQUIRE_STATUS(moekit_ep_layout(hc, 3, ids.data(), nullptr, layout, layout_bytes, host_layout,
                                    nullptr, nullptr, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "host_layout", "capacity mode");
    size_t cap_ws = 0;
    REQUIRE(moekit_ep_workspace_size(&cc, nullptr, &cap_ws) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(cap_ws <= sizeof(workspace_buffer.bytes));
    REQUIRE_STATUS(moekit_ep_combine(hc, T, layout, hl, rows, rows, ws, cap_ws, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "host_layout", "capacity mode");
    REQUIRE_STATUS(moekit_ep_layout_counts(hc, hl, nullptr, nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "capacity mode");
    CHECK(reached_device_check(moekit_ep_layout(hc, 3, ids.data(), nullptr, layout, layout_bytes,
                                                nullptr, nullptr, nullptr, nullptr)));
    CHECK(reached_device_check(
        moekit_ep_combine(hc, T, layout, nullptr, rows, rows, ws, cap_ws, nullptr)));
  }
  SECTION("a destroyed handle is refused") {
    FakeHandle dead(sim.config, 1);
    dead.handle.magic = 0;
    REQUIRE_STATUS(moekit_ep_combine(&dead.handle, T, layout, hl, rows, rows, ws, ws_bytes,
                                     nullptr),
                   MOEKIT_STATUS_INVALID_ARGUMENT, "not a live moekit_ep_handle_t");
    REQUIRE_STATUS(moekit_ep_destroy(&dead.handle), MOEKIT_STATUS_INVALID_ARGUMENT,
                   "not a live");
  }
}

}  // namespace
