// Tokens family on the CPU: the double reference checked against its definition and against
// identities (round trip, adjoints), the plan invariant checker shown to catch broken plans, the
// size queries, buffer binding, and every argument check of the C API (with host dummies: each
// rejected call returns before anything would be enqueued).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/tokens/plan_steps.hpp"
#include "moekit/moekit.h"
#include "tests/reference/tokens_ref.hpp"
#include "tests/support/catch.hpp"
#include "tests/support/random.hpp"
#include "tests/tokens/routing.hpp"

using moekit::test::make_indices;
using moekit::test::make_mask;
using moekit::test::make_weights;
using moekit::test::plan_config;
using moekit::test::Routing;

namespace {

struct Inputs {
  std::vector<int32_t> indices;
  std::vector<float> weights;
  std::vector<uint8_t> mask;
};

Inputs make_inputs(std::mt19937_64& rng, const moekit::test::PlanCase& pc, bool specials = false) {
  Inputs in;
  in.indices = make_indices(rng, pc.tokens, pc.config.top_k, pc.config.num_experts, pc.routing,
                            pc.invalid_fraction);
  in.weights = make_weights(rng, in.indices.size(), specials);
  if (pc.real_fraction < 1.0) in.mask = make_mask(rng, pc.tokens, pc.real_fraction);
  return in;
}

// The same plan built a second, independent way for dropless / drop-by-position configs: a stable
// sort of the routed slots by local expert.
moekit::ref::TokenPlan plan_by_stable_sort(const moekit::ref::TokenPlanConfig& c, int64_t tokens,
                                           const Inputs& in) {
  std::vector<std::pair<int, int64_t>> routed;
  int32_t invalid = 0;
  for (int64_t s = 0; s < tokens * c.top_k; ++s) {
    if (!in.mask.empty() && in.mask[s / c.top_k] == 0) continue;
    const int64_t id = in.indices[s];
    if (id < 0 || id >= c.num_experts) {
      ++invalid;
      continue;
    }
    if (id >= c.expert_begin && id < c.expert_begin + c.num_local)
      routed.push_back({static_cast<int>(id - c.expert_begin), s});
  }
  std::stable_sort(routed.begin(), routed.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  moekit::ref::TokenPlan p;
  p.invalid = invalid;
  p.row_of_slot.assign(tokens * c.top_k, -1);
  p.expert_counts.assign(c.num_local, 0);
  p.expert_offsets.assign(c.num_local + 1, 0);
  std::vector<int> seen(c.num_local, 0);
  for (const auto& [e, s] : routed) {
    if (c.capacity > 0 && seen[e] >= c.capacity) {
      ++p.dropped;
      continue;
    }
    ++seen[e];
  }
  int32_t row = 0;
  std::fill(seen.begin(), seen.end(), 0);
  size_t i = 0;
  for (int e = 0; e < c.num_local; ++e) {
    p.expert_offsets[e] = row;
    int32_t r = row;
    for (; i < routed.size() && routed[i].first == e; ++i) {
      if (c.capacity > 0 && seen[e] >= c.capacity) continue;
      ++seen[e];
      p.row_of_slot[routed[i].second] = r++;
    }
    p.expert_counts[e] = seen[e];
    row += (seen[e] + c.alignment - 1) / c.alignment * c.alignment;
  }
  p.expert_offsets[c.num_local] = row;
  p.total = row;
  p.slot_of_row.assign(row, -1);
  for (int64_t s = 0; s < tokens * c.top_k; ++s)
    if (p.row_of_slot[s] >= 0) p.slot_of_row[p.row_of_slot[s]] = static_cast<int32_t>(s);
  return p;
}

std::vector<double> random_doubles(std::mt19937_64& rng, size_t n) {
  std::uniform_int_distribution<int> q(-64, 64);
  std::vector<double> v(n);
  for (auto& x : v) x = q(rng) / 8.0;  // exact sums
  return v;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

std::string last_error() { return moekit_get_last_error(); }

}  // namespace

TEST_CASE("reference plan meets its definition on the awkward grid", "[tokens][reference]") {
  auto rng = moekit::test::make_rng(0x70c1);
  for (const auto& pc : moekit::test::plan_case_grid()) {
    const auto c = moekit::ref::resolve(pc.config);
    const Inputs in = make_inputs(rng, pc, true);
    const auto plan = moekit::ref::build_plan(c, pc.tokens, in.indices, in.weights, in.mask);
    INFO(moekit::test::describe(pc.config, pc.tokens));
    REQUIRE(moekit::ref::check_plan(c, pc.tokens, in.indices, in.weights, in.mask, plan) == "");
    if (!c.drop_by_weight) {
      const auto other = plan_by_stable_sort(c, pc.tokens, in);
      REQUIRE(plan.row_of_slot == other.row_of_slot);
      REQUIRE(plan.slot_of_row == other.slot_of_row);
      REQUIRE(plan.expert_counts == other.expert_counts);
      REQUIRE(plan.expert_offsets == other.expert_offsets);
      REQUIRE(plan.dropped == other.dropped);
      REQUIRE(plan.invalid == other.invalid);
    }
    int64_t max_rows = -1;
    REQUIRE(moekit_plan_max_rows(&pc.config, pc.tokens, &max_rows) == MOEKIT_STATUS_SUCCESS);
    REQUIRE(plan.total <= max_rows);
  }
}

TEST_CASE("the plan checker rejects broken plans", "[tokens][reference]") {
  auto rng = moekit::test::make_rng(0x70c2);
  const moekit::test::PlanCase pc{400, plan_config(16, 4, 8, 60, MOEKIT_DROP_BY_POSITION),
                                  Routing::kSkewed, 0.02, 0.9};
  const auto c = moekit::ref::resolve(pc.config);
  const Inputs in = make_inputs(rng, pc);
  const auto good = moekit::ref::build_plan(c, pc.tokens, in.indices, in.weights, in.mask);
  REQUIRE(moekit::ref::check_plan(c, pc.tokens, in.indices, in.weights, in.mask, good) == "");
  REQUIRE(good.dropped > 0);
  REQUIRE(good.invalid > 0);

  auto expect_broken = [&](const char* what, const std::function<void(moekit::ref::TokenPlan&)>& f) {
    auto bad = good;
    f(bad);
    INFO(what);
    REQUIRE(moekit::ref::check_plan(c, pc.tokens, in.indices, in.weights, in.mask, bad) != "");
  };
  // Two rows of one expert swapped: stable order broken.
  expect_broken("order", [](moekit::ref::TokenPlan& p) {
    for (size_t e = 0; e < p.expert_counts.size(); ++e)
      if (p.expert_counts[e] >= 2) {
        const int r = p.expert_offsets[e];
        std::swap(p.slot_of_row[r], p.slot_of_row[r + 1]);
        std::swap(p.row_of_slot[p.slot_of_row[r]], p.row_of_slot[p.slot_of_row[r + 1]]);
        return;
      }
  });
  expect_broken("unaligned offset", [](moekit::ref::TokenPlan& p) { p.expert_offsets[1] += 1; });
  expect_broken("padding sentinel", [](moekit::ref::TokenPlan& p) {
    for (size_t e = 0; e < p.expert_counts.size(); ++e)
      if (p.expert_offsets[e + 1] > p.expert_offsets[e] + p.expert_counts[e]) {
        p.slot_of_row[p.expert_offsets[e] + p.expert_counts[e]] = 0;
        return;
      }
  });
  expect_broken("dropped count", [](moekit::ref::TokenPlan& p) { p.dropped += 1; });
  expect_broken("invalid count", [](moekit::ref::TokenPlan& p) { p.invalid -= 1; });
  expect_broken("a slot lost", [](moekit::ref::TokenPlan& p) {
    for (auto& r : p.row_of_slot)
      if (r >= 0) {
        r = -1;
        return;
      }
  });
  expect_broken("a masked slot given a row", [&](moekit::ref::TokenPlan& p) {
    for (int64_t t = 0; t < pc.tokens; ++t)
      if (in.mask[t] == 0) {
        p.row_of_slot[t * c.top_k] = 0;
        return;
      }
  });
  // Capacity by position must keep the first pairs; keeping a later one instead is wrong even
  // though the counts still add up.
  expect_broken("wrong slot kept", [&](moekit::ref::TokenPlan& p) {
    for (int e = 0; e < c.num_local; ++e) {
      if (p.expert_counts[e] < c.capacity) continue;
      int64_t kept_slot = -1, dropped_slot = -1;
      for (int64_t s = 0; s < pc.tokens * c.top_k; ++s) {
        if ((in.mask[s / c.top_k] == 0) || in.indices[s] != e) continue;
        if (p.row_of_slot[s] >= 0) kept_slot = s;  // the last kept
        else if (dropped_slot < 0) dropped_slot = s;
      }
      if (kept_slot >= 0 && dropped_slot >= 0) {
        const int r = p.row_of_slot[kept_slot];
        p.row_of_slot[kept_slot] = -1;
        p.row_of_slot[dropped_slot] = r;
        p.slot_of_row[r] = static_cast<int32_t>(dropped_slot);
        return;
      }
    }
    FAIL("no expert over capacity");
  });
}

TEST_CASE("drop by weight keeps the heaviest pairs with the documented ties", "[tokens][reference]") {
  using moekit::ref::weight_ranks_before;
  const float nan = std::nanf("");
  REQUIRE(weight_ranks_before(0.5f, 9, 0.25f, 1));
  REQUIRE_FALSE(weight_ranks_before(0.25f, 1, 0.5f, 9));
  REQUIRE(weight_ranks_before(0.5f, 1, 0.5f, 9));              // ties: lower slot
  REQUIRE(weight_ranks_before(-0.0f, 1, 0.0f, 9));             // -0 == +0
  REQUIRE(weight_ranks_before(0.0f, 1, -0.0f, 9));
  REQUIRE(weight_ranks_before(-INFINITY, 9, nan, 1));          // NaN below every number
  REQUIRE(weight_ranks_before(nan, 1, nan, 9));

  // One expert, capacity 3, weights chosen so the answer is forced: slots 1, 3, 4 are kept.
  auto c = moekit::ref::resolve(plan_config(2, 1, 1, 3, MOEKIT_DROP_BY_WEIGHT));
  const std::vector<int32_t> idx = {0, 0, 1, 0, 0, 0, 0};
  const std::vector<float> w = {0.25f, 0.75f, 1.0f, 0.5f, 0.5f, 0.5f, nan};
  const auto p = moekit::ref::build_plan(c, 7, idx, w, {});
  REQUIRE(moekit::ref::check_plan(c, 7, idx, w, {}, p) == "");
  REQUIRE(p.dropped == 3);
  // Kept: 0.75 (slot 1), and the two lowest slots among the three 0.5s (3 and 4), in slot order.
  REQUIRE(p.row_of_slot[1] == 0);
  REQUIRE(p.row_of_slot[3] == 1);
  REQUIRE(p.row_of_slot[4] == 2);
  for (int s : {0, 5, 6}) REQUIRE(p.row_of_slot[s] == -1);
  REQUIRE(p.row_of_slot[2] == 3);  // expert 1 starts after expert 0's 3 rows
}

TEST_CASE("reference round trip and adjoint identities", "[tokens][reference]") {
  auto rng = moekit::test::make_rng(0x70c3);
  for (const auto& pc : moekit::test::plan_case_grid()) {
    if (pc.tokens > 2000) continue;
    const auto c = moekit::ref::resolve(pc.config);
    const Inputs in = make_inputs(rng, pc);
    const auto plan = moekit::ref::build_plan(c, pc.tokens, in.indices, in.weights, in.mask);
    const int64_t H = 3, T = pc.tokens, K = c.top_k;
    INFO(moekit::test::describe(pc.config, T));
    const auto x = random_doubles(rng, T * H);
    const auto w = random_doubles(rng, T * K);
    std::vector<double> xp, row_w;
    moekit::ref::permute(plan, c.top_k, T, H, x, w, &xp, &row_w);

    // combine(permute(x)) without weights = (rows of t) * x, exactly.
    const auto y = moekit::ref::combine(plan, c.top_k, T, H, xp, {});
    for (int64_t t = 0; t < T; ++t) {
      int rows = 0;
      for (int k = 0; k < K; ++k) rows += plan.row_of_slot[t * K + k] >= 0;
      for (int64_t h = 0; h < H; ++h) REQUIRE(y[t * H + h] == rows * x[t * H + h]);
    }
    // Padding rows are zero.
    for (int64_t r = 0; r < plan.total; ++r)
      if (plan.slot_of_row[r] < 0) {
        for (int64_t h = 0; h < H; ++h) REQUIRE(xp[r * H + h] == 0.0);
        REQUIRE(row_w[r] == 0.0);
      }

    // <permute(x), g> = <x, permute_backward(g)>, the same for the row weights.
    const auto g = random_doubles(rng, plan.total * H);
    const auto g_row_w = random_doubles(rng, plan.total);
    std::vector<double> dx, dw;
    moekit::ref::permute_backward(plan, c.top_k, T, H, g, g_row_w, &dx, &dw);
    REQUIRE(dot(xp, g) == dot(x, dx));
    REQUIRE(dot(row_w, g_row_w) == dot(w, dw));

    // <combine(yp, w), dy> = <yp, dyp> and d/dw_s <combine(yp, w), dy> = dw_s (linear in w).
    const auto yp = random_doubles(rng, plan.total * H);
    const auto dy = random_doubles(rng, T * H);
    std::vector<double> dyp, dw2, scale;
    moekit::ref::combine_backward(plan, c.top_k, T, H, dy, w, yp, &dyp, &dw2, &scale);
    const auto yc = moekit::ref::combine(plan, c.top_k, T, H, yp, w);
    for (int64_t r = 0; r < plan.total; ++r)
      if (plan.slot_of_row[r] < 0)
        for (int64_t h = 0; h < H; ++h) REQUIRE(dyp[r * H + h] == 0.0);
    REQUIRE(dot(yc, dy) == dot(yp, dyp));
    std::uniform_int_distribution<int64_t> pick(0, std::max<int64_t>(0, T * K - 1));
    for (int i = 0; i < 5 && T > 0; ++i) {
      const int64_t s = pick(rng);
      auto w2 = w;
      w2[s] += 1.0;
      const double delta = dot(moekit::ref::combine(plan, c.top_k, T, H, yp, w2), dy) - dot(yc, dy);
      REQUIRE(delta == dw2[s]);
    }
  }
}

TEST_CASE("max_rows bounds every plan and is reached", "[tokens][sizes]") {
  auto rng = moekit::test::make_rng(0x70c4);
  for (int A : {1, 8, 16, 128})
    for (int E : {1, 7, 64, 257}) {
      // N <= E_local: one pair per expert gives N A rows, the dropless bound.
      const auto cfg = plan_config(E, 1, A);
      for (int64_t T : {int64_t(0), int64_t(1), int64_t(E)}) {
        std::vector<int32_t> idx(T);
        for (int64_t t = 0; t < T; ++t) idx[t] = static_cast<int32_t>(t);
        const auto plan = moekit::ref::build_plan(moekit::ref::resolve(cfg), T, idx, {}, {});
        int64_t max_rows = -1;
        REQUIRE(moekit_plan_max_rows(&cfg, T, &max_rows) == MOEKIT_STATUS_SUCCESS);
        REQUIRE(max_rows == plan.total);
        REQUIRE(max_rows == T * A);
      }
      // Many tokens, capacity C: every expert full gives E_local roundup(C, A).
      for (int C : {1, 5, 129}) {
        const auto capped = plan_config(E, 1, A, C);
        const int64_t T = static_cast<int64_t>(E) * (C + 3);
        std::vector<int32_t> idx(T);
        for (int64_t t = 0; t < T; ++t) idx[t] = static_cast<int32_t>(t % E);
        const auto plan = moekit::ref::build_plan(moekit::ref::resolve(capped), T, idx, {}, {});
        int64_t max_rows = -1;
        REQUIRE(moekit_plan_max_rows(&capped, T, &max_rows) == MOEKIT_STATUS_SUCCESS);
        REQUIRE(max_rows == plan.total);
        // And it never exceeds the dropless bound.
        int64_t dropless = -1;
        REQUIRE(moekit_plan_max_rows(&cfg, T, &dropless) == MOEKIT_STATUS_SUCCESS);
        REQUIRE(max_rows <= dropless);
      }
      // Random routings stay under the bound.
      for (int trial = 0; trial < 20; ++trial) {
        const int K = std::min(E, 1 + trial % 8);
        const auto c2 = plan_config(E, K, A, trial % 3 == 0 ? 3 : 0);
        const int64_t T = 1 + trial * 13;
        const auto idx = make_indices(rng, T, K, E, Routing::kAny);
        const auto plan = moekit::ref::build_plan(moekit::ref::resolve(c2), T, idx, {}, {});
        int64_t max_rows = -1;
        REQUIRE(moekit_plan_max_rows(&c2, T, &max_rows) == MOEKIT_STATUS_SUCCESS);
        REQUIRE(plan.total <= max_rows);
      }
    }
}

TEST_CASE("plan config: defaults, every bad field, struct growth", "[tokens][api]") {
  moekit_plan_config_t c;
  std::memset(&c, 0x5a, sizeof(c));
  REQUIRE(moekit_plan_config_init(&c, sizeof(c)) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(c.struct_size == sizeof(c));
  REQUIRE(c.num_experts == 0);
  REQUIRE(c.top_k == 0);
  REQUIRE(c.local_expert_begin == 0);
  REQUIRE(c.num_local_experts == 0);
  REQUIRE(c.alignment == 1);
  REQUIRE(c.capacity == 0);
  REQUIRE(c.drop_policy == MOEKIT_DROP_BY_POSITION);
  REQUIRE(moekit_plan_config_check(&c) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("moekit_plan_config_check: config->num_experts = 0") == 0);

  struct Bad {
    std::function<void(moekit_plan_config_t&)> set;
    const char* message;
  };
  const Bad bad[] = {
      {[](auto& x) { x.num_experts = -3; }, "config->num_experts = -3"},
      {[](auto& x) { x.top_k = 0; }, "config->top_k = 0"},
      {[](auto& x) { x.top_k = 33; }, "config->top_k = 33"},
      {[](auto& x) { x.num_experts = 4; x.top_k = 8; }, "config->top_k = 8 exceeds num_experts = 4"},
      {[](auto& x) { x.local_expert_begin = -1; }, "config->local_expert_begin = -1"},
      {[](auto& x) { x.local_expert_begin = 64; }, "config->local_expert_begin = 64"},
      {[](auto& x) { x.num_local_experts = -2; }, "config->num_local_experts = -2"},
      {[](auto& x) { x.local_expert_begin = 60; x.num_local_experts = 8; },
       "config->local_expert_begin + num_local_experts = 60 + 8 exceeds num_experts = 64"},
      {[](auto& x) { x.num_experts = 4097; }, "config->num_local_experts = 4097"},
      {[](auto& x) { x.num_experts = 5000; x.local_expert_begin = 100; },
       "config->num_local_experts = 4900"},
      {[](auto& x) { x.alignment = 0; }, "config->alignment = 0"},
      {[](auto& x) { x.capacity = -1; }, "config->capacity = -1"},
      {[](auto& x) { x.drop_policy = 2; }, "config->drop_policy = 2"},
  };
  for (const auto& b : bad) {
    moekit_plan_config_t x = plan_config(64, 4);
    REQUIRE(moekit_plan_config_check(&x) == MOEKIT_STATUS_SUCCESS);
    b.set(x);
    INFO(b.message);
    REQUIRE(moekit_plan_config_check(&x) == MOEKIT_STATUS_INVALID_ARGUMENT);
    REQUIRE(last_error().find(b.message) != std::string::npos);
  }
  // E far past the local limit is fine when the local range is within it.
  moekit_plan_config_t ep = plan_config(100000, 8, 1, 0, MOEKIT_DROP_BY_POSITION, 96000, 4000);
  REQUIRE(moekit_plan_config_check(&ep) == MOEKIT_STATUS_SUCCESS);

  REQUIRE(moekit_plan_config_check(nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("config is NULL") != std::string::npos);
  REQUIRE(moekit_plan_config_init(nullptr, sizeof(c)) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(moekit_plan_config_init(&c, 8) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("struct_size = 8") != std::string::npos);
  moekit_plan_config_t unset = plan_config(64, 4);
  unset.struct_size = 4;
  REQUIRE(moekit_plan_config_check(&unset) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("config->struct_size = 4") != std::string::npos);

  // A newer caller's larger struct: the known part is read, the rest ignored.
  struct Newer {
    moekit_plan_config_t base;
    int32_t future_field;
  } newer;
  REQUIRE(moekit_plan_config_init(&newer.base, sizeof(newer)) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(newer.base.struct_size == sizeof(newer));
  newer.base.num_experts = 16;
  newer.base.top_k = 2;
  newer.future_field = 12345;
  REQUIRE(moekit_plan_config_check(&newer.base) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(newer.future_field == 12345);  // init wrote only its own fields
}

TEST_CASE("size queries depend only on the arguments and refuse int32 overflow", "[tokens][sizes]") {
  const auto cfg = plan_config(256, 8, 16);
  size_t ws0 = 0, ws1 = 0, ws2 = 0, wsw = 0;
  REQUIRE(moekit_plan_workspace_size(&cfg, 0, &ws0) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(moekit_plan_workspace_size(&cfg, 16384, &ws1) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(moekit_plan_workspace_size(&cfg, 16384, &ws2) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(ws0 > 0);
  REQUIRE(ws1 == ws2);
  REQUIRE(ws1 % MOEKIT_WORKSPACE_ALIGNMENT == 0);
  const auto by_weight = plan_config(256, 8, 16, 600, MOEKIT_DROP_BY_WEIGHT);
  REQUIRE(moekit_plan_workspace_size(&by_weight, 16384, &wsw) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(wsw >= ws1 + 2 * 16384 * 8 * sizeof(int32_t));  // the per-expert lists

  int64_t rows = 0;
  REQUIRE(moekit_plan_max_rows(&cfg, 16384, &rows) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(rows == 16384 * 8 + 256 * 15);
  REQUIRE(moekit_plan_max_rows(&cfg, -1, &rows) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("moekit_plan_max_rows: num_tokens = -1") == 0);
  REQUIRE(moekit_plan_max_rows(&cfg, int64_t(1) << 29, &rows) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("num_tokens = 536870912 times top_k = 8") != std::string::npos);
  const auto huge_a = plan_config(4096, 1, 1 << 20);
  REQUIRE(moekit_plan_max_rows(&huge_a, 4096, &rows) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("past INT32_MAX") != std::string::npos);
  REQUIRE(moekit_plan_max_rows(&cfg, 10, nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("max_rows is NULL") != std::string::npos);
  REQUIRE(moekit_plan_workspace_size(&cfg, 10, nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("workspace_bytes is NULL") != std::string::npos);
  REQUIRE(moekit_plan_buffer_size(&cfg, 10, nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("buffer_bytes is NULL") != std::string::npos);
}

TEST_CASE("one buffer holds the whole plan", "[tokens][sizes]") {
  const auto cfg = plan_config(257, 4, 8, 0, MOEKIT_DROP_BY_POSITION, 3, 200);
  const int64_t T = 1001;
  size_t bytes = 0;
  int64_t max_rows = 0;
  REQUIRE(moekit_plan_buffer_size(&cfg, T, &bytes) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(moekit_plan_max_rows(&cfg, T, &max_rows) == MOEKIT_STATUS_SUCCESS);
  std::vector<char> storage(bytes + 512);
  char* base = storage.data() + (256 - reinterpret_cast<uintptr_t>(storage.data()) % 256);
  moekit_token_plan_t plan;
  std::memset(&plan, 0x33, sizeof(plan));
  REQUIRE(moekit_token_plan_init(&plan, sizeof(plan)) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(plan.struct_size == sizeof(plan));
  REQUIRE(plan.expert_counts == nullptr);
  REQUIRE(plan.totals == nullptr);
  REQUIRE(moekit_plan_bind(&cfg, T, base, bytes, &plan) == MOEKIT_STATUS_SUCCESS);
  struct Piece {
    char* p;
    size_t bytes;
  };
  std::vector<Piece> pieces = {{reinterpret_cast<char*>(plan.expert_counts), 200 * 4},
                               {reinterpret_cast<char*>(plan.expert_offsets), 201 * 4},
                               {reinterpret_cast<char*>(plan.row_of_slot), size_t(T) * 4 * 4},
                               {reinterpret_cast<char*>(plan.slot_of_row), size_t(max_rows) * 4},
                               {reinterpret_cast<char*>(plan.totals), MOEKIT_PLAN_NUM_TOTALS * 4}};
  std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.p < b.p; });
  for (size_t i = 0; i < pieces.size(); ++i) {
    REQUIRE(pieces[i].p >= base);
    REQUIRE(pieces[i].p + pieces[i].bytes <= base + bytes);
    REQUIRE((pieces[i].p - base) % 256 == 0);
    if (i + 1 < pieces.size()) REQUIRE(pieces[i].p + pieces[i].bytes <= pieces[i + 1].p);
  }
  REQUIRE(moekit_plan_bind(&cfg, T, base, bytes - 1, &plan) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("buffer_bytes = ") != std::string::npos);
  REQUIRE(moekit_plan_bind(&cfg, T, base + 1, bytes, &plan) == MOEKIT_STATUS_MISALIGNED);
  REQUIRE(last_error().find("buffer = ") != std::string::npos);
  REQUIRE(moekit_plan_bind(&cfg, T, nullptr, bytes, &plan) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("buffer is NULL") != std::string::npos);
  REQUIRE(moekit_plan_bind(&cfg, T, base, bytes, nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("plan is NULL") != std::string::npos);
  moekit_token_plan_t unset{};
  REQUIRE(moekit_plan_bind(&cfg, T, base, bytes, &unset) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(last_error().find("plan->struct_size = 0") != std::string::npos);
  REQUIRE(moekit_token_plan_init(&plan, 3) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(moekit_token_plan_init(nullptr, sizeof(plan)) == MOEKIT_STATUS_INVALID_ARGUMENT);
}

namespace {

// Host dummies: never dereferenced, because every call below fails validation first.
struct Dummies {
  std::vector<int32_t> i32 = std::vector<int32_t>(4096);
  std::vector<float> f32 = std::vector<float>(4096);
  std::vector<uint8_t> u8 = std::vector<uint8_t>(4096);
  alignas(256) char workspace[1 << 16];
  moekit_token_plan_t plan;
  Dummies() {
    moekit_token_plan_init(&plan, sizeof(plan));
    plan.expert_counts = i32.data();
    plan.expert_offsets = i32.data() + 1024;
    plan.row_of_slot = i32.data() + 2048;
    plan.slot_of_row = i32.data() + 3072;
    plan.totals = i32.data() + 4000;
  }
};

struct Rejection {
  const char* name;
  std::function<moekit_status_t()> call;
  moekit_status_t status;
  const char* message;
};

void expect_rejections(const std::vector<Rejection>& cases) {
  for (const auto& r : cases) {
    INFO(r.name);
    const moekit_status_t s = r.call();
    INFO("message: " << last_error());
    REQUIRE(s == r.status);
    REQUIRE(last_error().find(r.message) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("moekit_plan_build rejects bad arguments before enqueueing", "[tokens][api]") {
  static Dummies d;
  const auto cfg = plan_config(16, 2, 8);
  const auto by_weight = plan_config(16, 2, 1, 4, MOEKIT_DROP_BY_WEIGHT);
  size_t ws = 0;
  REQUIRE(moekit_plan_workspace_size(&cfg, 100, &ws) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(ws <= sizeof(d.workspace));
  auto build = [&](const moekit_plan_config_t* c, int64_t T, const int32_t* idx, const float* w,
                   const moekit_token_plan_t* p, void* work, size_t bytes) {
    return moekit_plan_build(c, T, idx, w, d.u8.data(), p, work, bytes, nullptr);
  };
  auto with = [&](std::function<void(moekit_token_plan_t&)> f) {
    auto p = std::make_shared<moekit_token_plan_t>(d.plan);
    f(*p);
    return p;
  };
  const auto no_counts = with([](auto& p) { p.expert_counts = nullptr; });
  const auto no_offsets = with([](auto& p) { p.expert_offsets = nullptr; });
  const auto no_rows = with([](auto& p) { p.row_of_slot = nullptr; });
  const auto no_slots = with([](auto& p) { p.slot_of_row = nullptr; });
  const auto no_totals = with([](auto& p) { p.totals = nullptr; });
  const auto old = with([](auto& p) { p.struct_size = 8; });
  moekit_plan_config_t bad_cfg = cfg;
  bad_cfg.alignment = -4;
  expect_rejections({
      {"config NULL", [&] { return build(nullptr, 100, d.i32.data(), nullptr, &d.plan, d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "moekit_plan_build: config is NULL"},
      {"bad config", [&] { return build(&bad_cfg, 100, d.i32.data(), nullptr, &d.plan, d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "config->alignment = -4"},
      {"T < 0", [&] { return build(&cfg, -5, d.i32.data(), nullptr, &d.plan, d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "num_tokens = -5 is negative"},
      {"indices NULL", [&] { return build(&cfg, 100, nullptr, nullptr, &d.plan, d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "indices is NULL (num_tokens = 100)"},
      {"weights NULL for drop by weight",
       [&] { return build(&by_weight, 100, d.i32.data(), nullptr, &d.plan, d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "weights is NULL but config->capacity = 4"},
      {"plan NULL", [&] { return build(&cfg, 100, d.i32.data(), nullptr, nullptr, d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan is NULL"},
      {"plan struct_size", [&] { return build(&cfg, 100, d.i32.data(), nullptr, old.get(), d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan->struct_size = 8"},
      {"counts NULL", [&] { return build(&cfg, 100, d.i32.data(), nullptr, no_counts.get(), d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan->expert_counts is NULL"},
      {"offsets NULL", [&] { return build(&cfg, 100, d.i32.data(), nullptr, no_offsets.get(), d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan->expert_offsets is NULL"},
      {"row_of_slot NULL", [&] { return build(&cfg, 100, d.i32.data(), nullptr, no_rows.get(), d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan->row_of_slot is NULL (num_tokens = 100)"},
      {"slot_of_row NULL", [&] { return build(&cfg, 100, d.i32.data(), nullptr, no_slots.get(), d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan->slot_of_row is NULL"},
      {"totals NULL", [&] { return build(&cfg, 100, d.i32.data(), nullptr, no_totals.get(), d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan->totals is NULL"},
      {"counts NULL at T = 0", [&] { return build(&cfg, 0, nullptr, nullptr, no_counts.get(), d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan->expert_counts is NULL"},
      {"workspace too small", [&] { return build(&cfg, 100, d.i32.data(), nullptr, &d.plan, d.workspace, ws - 1); },
       MOEKIT_STATUS_WORKSPACE_TOO_SMALL, "workspace_bytes = "},
      {"workspace NULL", [&] { return build(&cfg, 100, d.i32.data(), nullptr, &d.plan, nullptr, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "workspace is NULL"},
      {"workspace misaligned", [&] { return build(&cfg, 100, d.i32.data(), nullptr, &d.plan, d.workspace + 1, ws); },
       MOEKIT_STATUS_MISALIGNED, "is not aligned to 256 bytes"},
      {"T K past int32", [&] { return build(&cfg, int64_t(1) << 31, d.i32.data(), nullptr, &d.plan, d.workspace, ws); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "exceeds INT32_MAX slots"},
  });
}

TEST_CASE("movement entry points reject bad arguments before enqueueing", "[tokens][api]") {
  static Dummies d;
  const auto cfg = plan_config(16, 2, 8);
  const auto cfg1 = plan_config(16, 2, 1);
  const int64_t T = 100, H = 64;
  const void* x = d.f32.data();
  void* out = d.f32.data() + 8;
  float* w = d.f32.data() + 16;
  float* rw = d.f32.data() + 24;
  const auto bf16 = MOEKIT_DTYPE_BF16;
  moekit_token_plan_t no_rows = d.plan;
  no_rows.row_of_slot = nullptr;
  moekit_token_plan_t no_offsets = d.plan;
  no_offsets.expert_offsets = nullptr;
  moekit_token_plan_t no_counts = d.plan;
  no_counts.expert_counts = nullptr;
  auto permute = [&](const moekit_plan_config_t* c, const moekit_token_plan_t* p, int64_t t, int64_t h,
                     moekit_dtype_t dt, const void* xx, int64_t stride, const float* ww, void* xp, float* rww) {
    return moekit_tokens_permute(c, p, t, h, dt, xx, stride, ww, xp, rww, nullptr);
  };
  expect_rejections({
      {"permute: config NULL", [&] { return permute(nullptr, &d.plan, T, H, bf16, x, H, w, out, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "moekit_tokens_permute: config is NULL"},
      {"permute: plan NULL", [&] { return permute(&cfg, nullptr, T, H, bf16, x, H, w, out, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan is NULL"},
      {"permute: T < 0", [&] { return permute(&cfg, &d.plan, -1, H, bf16, x, H, w, out, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "num_tokens = -1"},
      {"permute: H = 0", [&] { return permute(&cfg, &d.plan, T, 0, bf16, x, H, w, out, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "hidden = 0 is outside"},
      {"permute: H too big", [&] { return permute(&cfg, &d.plan, T, int64_t(1) << 32, bf16, x, int64_t(1) << 32, w, out, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "hidden = 4294967296 is outside"},
      {"permute: dtype", [&] { return permute(&cfg, &d.plan, T, H, static_cast<moekit_dtype_t>(7), x, H, w, out, rw); },
       MOEKIT_STATUS_UNSUPPORTED, "dtype = 7"},
      {"permute: row_of_slot NULL", [&] { return permute(&cfg, &no_rows, T, H, bf16, x, H, w, out, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan->row_of_slot is NULL"},
      {"permute: x NULL", [&] { return permute(&cfg, &d.plan, T, H, bf16, nullptr, H, w, out, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "x is NULL (num_tokens = 100)"},
      {"permute: stride", [&] { return permute(&cfg, &d.plan, T, H, bf16, x, H - 1, w, out, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "x_row_stride = 63 is less than hidden = 64"},
      {"permute: stride overflow", [&] { return permute(&cfg, &d.plan, T, H, bf16, x, INT64_MAX / 8, w, out, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "overflows a 64-bit byte offset"},
      {"permute: weights without row_weights", [&] { return permute(&cfg, &d.plan, T, H, bf16, x, H, w, out, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "give both or neither"},
      {"permute: row_weights without weights", [&] { return permute(&cfg, &d.plan, T, H, bf16, x, H, nullptr, out, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "give both or neither"},
      {"permute: xp NULL", [&] { return permute(&cfg, &d.plan, T, H, bf16, x, H, w, nullptr, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "xp is NULL"},
      {"permute: offsets NULL with padding", [&] { return permute(&cfg, &no_offsets, T, H, bf16, x, H, w, out, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan->expert_offsets is NULL (needed for padding rows, alignment = 8)"},
      {"permute: counts NULL with padding", [&] { return permute(&cfg, &no_counts, T, H, bf16, x, H, w, out, rw); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan->expert_counts is NULL"},
      {"combine: yp NULL", [&] { return moekit_tokens_combine(&cfg, &d.plan, T, H, bf16, nullptr, w, out, H, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "moekit_tokens_combine: yp is NULL"},
      {"combine: y NULL", [&] { return moekit_tokens_combine(&cfg, &d.plan, T, H, bf16, x, w, nullptr, H, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "y is NULL"},
      {"combine: stride", [&] { return moekit_tokens_combine(&cfg, &d.plan, T, H, bf16, x, w, out, 3, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "y_row_stride = 3 is less than hidden = 64"},
      {"combine: dtype", [&] { return moekit_tokens_combine(&cfg, &d.plan, T, H, static_cast<moekit_dtype_t>(-1), x, w, out, H, nullptr); },
       MOEKIT_STATUS_UNSUPPORTED, "dtype = -1"},
      {"combine: bad config", [&] { auto c = cfg; c.top_k = 99; return moekit_tokens_combine(&c, &d.plan, T, H, bf16, x, w, out, H, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "config->top_k = 99"},
      {"permute backward: grad_xp NULL", [&] { return moekit_tokens_permute_backward(&cfg, &d.plan, T, H, bf16, nullptr, rw, out, H, w, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "moekit_tokens_permute_backward: grad_xp is NULL"},
      {"permute backward: grad_x NULL", [&] { return moekit_tokens_permute_backward(&cfg, &d.plan, T, H, bf16, x, rw, nullptr, H, w, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "grad_x is NULL"},
      {"permute backward: pair", [&] { return moekit_tokens_permute_backward(&cfg, &d.plan, T, H, bf16, x, rw, out, H, nullptr, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "grad_row_weights = "},
      {"permute backward: stride", [&] { return moekit_tokens_permute_backward(&cfg, &d.plan, T, H, bf16, x, nullptr, out, 0, nullptr, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "grad_x_row_stride = 0 is less than hidden = 64"},
      {"combine backward: nothing to do", [&] { return moekit_tokens_combine_backward(&cfg, &d.plan, T, H, bf16, x, H, w, x, nullptr, nullptr, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "grad_yp and grad_weights are both NULL"},
      {"combine backward: nothing to do at T = 0", [&] { return moekit_tokens_combine_backward(&cfg, &d.plan, 0, H, bf16, nullptr, H, nullptr, nullptr, nullptr, nullptr, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "grad_yp and grad_weights are both NULL"},
      {"combine backward: grad_y NULL", [&] { return moekit_tokens_combine_backward(&cfg, &d.plan, T, H, bf16, nullptr, H, w, x, out, nullptr, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "moekit_tokens_combine_backward: grad_y is NULL"},
      {"combine backward: yp NULL", [&] { return moekit_tokens_combine_backward(&cfg, &d.plan, T, H, bf16, x, H, w, nullptr, nullptr, rw, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "yp is NULL but grad_weights needs it"},
      {"combine backward: stride", [&] { return moekit_tokens_combine_backward(&cfg, &d.plan, T, H, bf16, x, 10, w, x, out, nullptr, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "grad_y_row_stride = 10 is less than hidden = 64"},
      {"combine backward: padding arrays", [&] { return moekit_tokens_combine_backward(&cfg, &no_offsets, T, H, bf16, x, H, w, x, out, nullptr, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan->expert_offsets is NULL"},
      {"combine: plan row_of_slot NULL", [&] { return moekit_tokens_combine(&cfg1, &no_rows, T, H, bf16, x, w, out, H, nullptr); },
       MOEKIT_STATUS_INVALID_ARGUMENT, "plan->row_of_slot is NULL"},
  });
}

// ---- the plan kernels' index arithmetic, replayed on the host -----------------------------------
// kernels/tokens/plan.cu runs its index arithmetic through kernels/tokens/plan_steps.hpp. This
// replay calls the same functions in the kernels' order (blocks, then tiles, warps, steps and
// lanes; ballots as the OR of the lanes' bits; the per-warp counters, their inclusive scan over
// warps, the column sums split as the kernel splits them) and checks the result against the
// reference. Every array access is bounds-checked, and the uint16 counters are checked for
// overflow, so an index the device would compute out of range fails here.
namespace {

namespace kt = moekit::kernels::tokens;

struct ReplayedPlan {
  moekit::ref::TokenPlan plan;          // slot_of_row cut at the total
  std::vector<int32_t> slot_of_row_all; // [max_rows], -7 where never written
  std::vector<int32_t> raw_counts, list_offsets, list_slots;
  std::vector<uint32_t> list_keys;
  int blocks = 0;
};

template <class T>
T& at(std::vector<T>& v, int64_t i) {
  if (i < 0 || i >= static_cast<int64_t>(v.size()))
    throw std::out_of_range("replayed kernel index " + std::to_string(i) + " outside [0, " +
                            std::to_string(v.size()) + ")");
  return v[static_cast<size_t>(i)];
}

ReplayedPlan replay_plan_kernels(const moekit_plan_config_t& cfg, int64_t T, const Inputs& in) {
  const auto c = moekit::ref::resolve(cfg);
  int64_t max_rows = 0;
  REQUIRE(moekit_plan_max_rows(&cfg, T, &max_rows) == MOEKIT_STATUS_SUCCESS);
  const int64_t N = T * c.top_k;
  const int EL = c.num_local;
  const kt::PlanGrid grid = kt::plan_grid(N, EL);
  const int B = grid.blocks;
  const int bins = EL + 1;

  ReplayedPlan out;
  out.blocks = B;
  std::vector<int32_t> table(static_cast<size_t>(B) * bins, -7);
  std::vector<int32_t> counts(EL, -7), offsets(EL + 1, -7), row_of_slot(N, -7), totals(3, -7);
  out.slot_of_row_all.assign(max_rows, -7);
  out.raw_counts.assign(EL, -7);
  out.list_offsets.assign(EL, -7);
  out.list_slots.assign(N, -7);
  out.list_keys.assign(N, 0xdeadbeefu);

  kt::PlanArgs a{};
  a.indices = in.indices.data();
  a.weights = in.weights.data();
  a.token_mask = in.mask.empty() ? nullptr : in.mask.data();
  a.num_slots = static_cast<int32_t>(N);
  a.top_k = c.top_k;
  a.num_experts = c.num_experts;
  a.expert_begin = c.expert_begin;
  a.num_local = EL;
  a.alignment = c.alignment;
  a.capacity = c.capacity;
  a.drop_by_weight = c.drop_by_weight ? 1 : 0;
  a.num_blocks = B;
  a.slots_per_block = grid.slots_per_block;
  const int bits = kt::label_bits(EL);
  REQUIRE((1 << bits) > EL + 1);  // every label fits
  const int cap = kt::capacity_or_max(a);

  // Labels and peer masks of one 32-slot step, as the warp's ballots compute them.
  auto step = [&](int64_t tile, int64_t end, int warp, int it, int (&label)[32], unsigned (&peers)[32]) {
    for (int lane = 0; lane < 32; ++lane) {
      const int64_t s = kt::plan_slot(tile, warp, it, lane);
      label[lane] = s < end ? kt::slot_label(a, s) : kt::label_none(EL);
      peers[lane] = 0xffffffffu;
    }
    for (int bit = 0; bit < bits; ++bit) {
      unsigned vote = 0;
      for (int lane = 0; lane < 32; ++lane)
        if ((label[lane] >> bit) & 1) vote |= 1u << lane;
      for (int lane = 0; lane < 32; ++lane) peers[lane] = kt::fold_vote(peers[lane], vote, label[lane], bit);
    }
    for (int lane = 0; lane < 32; ++lane) {  // the ballots found exactly the equal labels
      unsigned want = 0;
      for (int other = 0; other < 32; ++other)
        if (label[other] == label[lane]) want |= 1u << other;
      REQUIRE(peers[lane] == want);
    }
  };
  auto leader = [](unsigned peers) { int l = 0; while (!((peers >> l) & 1u)) ++l; return l; };

  // ---- kernel 1: counts per block
  for (int b = 0; b < B; ++b) {
    std::vector<int32_t> hist(bins, 0);
    const int64_t begin = static_cast<int64_t>(b) * a.slots_per_block;
    const int64_t end = std::min(N, begin + a.slots_per_block);
    for (int64_t tile = begin; tile < end; tile += kt::kPlanTileSlots)
      for (int warp = 0; warp < kt::kPlanWarps; ++warp)
        for (int it = 0; it < kt::kPlanItersPerWarp; ++it) {
          int label[32];
          unsigned peers[32];
          step(tile, end, warp, it, label, peers);
          for (int lane = 0; lane < 32; ++lane) {
            // The kernel adds a group once (few labels) or each lane on its own.
            const unsigned p = kt::count_aggregates(EL) ? peers[lane] : 1u << lane;
            if (label[lane] <= EL && lane == leader(p)) at(hist, label[lane]) += __builtin_popcount(p);
          }
        }
    for (int i = 0; i < bins; ++i) {
      // The kernels store 16-bit entries when the grid's blocks are narrow: every count must fit.
      if (kt::plan_table_is_narrow(grid.slots_per_block)) REQUIRE(hist[i] <= 0xffff);
      at(table, static_cast<int64_t>(b) * bins + i) = hist[i];
    }
  }

  // ---- kernel 2: offsets and stable ranks
  for (int b = 0; b < B; ++b) {
    std::vector<int32_t> s_n(EL), s_off(EL + 1), s_run(EL), s_list(EL);
    // Column sums, split over threads as the kernel splits them.
    if (EL >= kt::kPlanThreads) {
      for (int e = 0; e < EL; ++e) {
        int pre = 0, tot = 0;
        for (int r = 0; r < B; ++r) {
          const int v = at(table, static_cast<int64_t>(r) * bins + e);
          tot += v;
          pre += r < b ? v : 0;
        }
        s_n[e] = tot;
        s_run[e] = pre;
      }
    } else {
      const int parts = kt::column_parts(EL, B);
      REQUIRE(parts >= 1);
      REQUIRE(parts * EL <= kt::kPlanThreads);
      std::vector<int> part_pre(kt::kPlanThreads, 0), part_tot(kt::kPlanThreads, 0);
      for (int tid = 0; tid < kt::kPlanThreads; ++tid) {
        const int e = tid % EL, p = tid / EL;
        if (p >= parts) continue;
        for (int r = p; r < B; r += parts) {
          const int v = at(table, static_cast<int64_t>(r) * bins + e);
          part_tot[tid] += v;
          part_pre[tid] += r < b ? v : 0;
        }
      }
      for (int e = 0; e < EL; ++e) {
        s_run[e] = s_n[e] = 0;
        for (int q = 0; q < parts; ++q) {
          s_run[e] += at(part_pre, q * EL + e);
          s_n[e] += at(part_tot, q * EL + e);
        }
      }
    }
    // Offsets: contiguous runs of experts per thread, an exclusive scan over the threads.
    const int per_thread = (EL + kt::kPlanThreads - 1) / kt::kPlanThreads;
    int64_t size_prefix = 0, list_prefix = 0, dropped = 0;
    for (int tid = 0; tid < kt::kPlanThreads; ++tid) {
      const int e_begin = std::min(EL, tid * per_thread), e_end = std::min(EL, e_begin + per_thread);
      for (int e = e_begin; e < e_end; ++e) {
        const int n = s_n[e];
        s_off[e] = static_cast<int32_t>(size_prefix);
        size_prefix += kt::padded_size(std::min(n, cap), a.alignment);
        s_list[e] = static_cast<int32_t>(list_prefix);
        if (kt::listed(a, n, cap)) list_prefix += n;
        dropped += n - std::min(n, cap);
      }
    }
    REQUIRE(size_prefix <= max_rows);
    s_off[EL] = static_cast<int32_t>(size_prefix);
    if (b == 0) {
      int invalid = 0;
      for (int r = 0; r < B; ++r) invalid += at(table, static_cast<int64_t>(r) * bins + EL);
      totals = {s_off[EL], static_cast<int32_t>(dropped), invalid};
      for (int e = 0; e < EL; ++e) {
        counts[e] = std::min(s_n[e], cap);
        offsets[e] = s_off[e];
        if (a.drop_by_weight) {
          out.raw_counts[e] = s_n[e];
          out.list_offsets[e] = s_list[e];
        }
      }
      offsets[EL] = s_off[EL];
    }
    // Padding: one warp per expert.
    for (int warp = 0; warp < kt::kPlanWarps; ++warp)
      for (int e = b + warp * B; e < EL; e += B * kt::kPlanWarps)
        for (int lane = 0; lane < 32; ++lane)
          for (int r = s_off[e] + std::min(s_n[e], cap) + lane; r < s_off[e + 1]; r += 32)
            at(out.slot_of_row_all, r) = kt::kNoRow;
    // Tiles.
    const int64_t begin = static_cast<int64_t>(b) * a.slots_per_block;
    const int64_t end = std::min(N, begin + a.slots_per_block);
    std::vector<int> wcnt(static_cast<size_t>(kt::kPlanWarps) * EL, 0);
    for (int64_t tile = begin; tile < end; tile += kt::kPlanTileSlots) {
      int label[kt::kPlanWarps][kt::kPlanItersPerWarp][32];
      unsigned peers[kt::kPlanWarps][kt::kPlanItersPerWarp][32];
      int wrank[kt::kPlanWarps][kt::kPlanItersPerWarp][32];
      for (int warp = 0; warp < kt::kPlanWarps; ++warp)
        for (int it = 0; it < kt::kPlanItersPerWarp; ++it) {
          step(tile, end, warp, it, label[warp][it], peers[warp][it]);
          int before[32];
          for (int lane = 0; lane < 32; ++lane) {
            const int l = label[warp][it][lane];
            before[lane] = l < EL ? at(wcnt, static_cast<int64_t>(warp) * EL + l) : 0;
          }
          for (int lane = 0; lane < 32; ++lane) {
            const int l = label[warp][it][lane];
            const unsigned p = peers[warp][it][lane];
            if (l < EL && lane == leader(p)) {
              const int v = before[lane] + __builtin_popcount(p);
              REQUIRE(v <= 65535);
              at(wcnt, static_cast<int64_t>(warp) * EL + l) = v;
            }
            wrank[warp][it][lane] = before[lane] + __builtin_popcount(p & ((1u << lane) - 1u));
          }
        }
      for (int e = 0; e < EL; ++e) {  // inclusive scan over warps
        int run = 0;
        for (int w = 0; w < kt::kPlanWarps; ++w) {
          run += wcnt[static_cast<size_t>(w) * EL + e];
          REQUIRE(run <= 65535);
          wcnt[static_cast<size_t>(w) * EL + e] = run;
        }
      }
      for (int warp = 0; warp < kt::kPlanWarps; ++warp)
        for (int it = 0; it < kt::kPlanItersPerWarp; ++it)
          for (int lane = 0; lane < 32; ++lane) {
            const int64_t s = kt::plan_slot(tile, warp, it, lane);
            const int l = label[warp][it][lane];
            if (l < EL) {
              const int earlier = warp > 0 ? wcnt[static_cast<size_t>(warp - 1) * EL + l] : 0;
              const int pos = s_run[l] + earlier + wrank[warp][it][lane];
              const kt::Placement pl = kt::place_slot(a, pos, s_n[l], cap, s_off[l], s_list[l]);
              if (pl.kind == kt::Place::kRow) {
                REQUIRE(pl.index < s_off[l + 1]);
                at(row_of_slot, s) = pl.index;
                at(out.slot_of_row_all, pl.index) = static_cast<int32_t>(s);
              } else if (pl.kind == kt::Place::kDropped) {
                at(row_of_slot, s) = kt::kNoRow;
              } else {
                REQUIRE(pl.index < s_list[l] + s_n[l]);
                at(out.list_slots, pl.index) = static_cast<int32_t>(s);
                at(out.list_keys, pl.index) = kt::weight_key(in.weights[s]);
              }
            } else if (s < end) {
              at(row_of_slot, s) = kt::kNoRow;
            }
          }
      for (int e = 0; e < EL; ++e) {
        s_run[e] += wcnt[static_cast<size_t>(kt::kPlanWarps - 1) * EL + e];
        for (int w = 0; w < kt::kPlanWarps; ++w) wcnt[static_cast<size_t>(w) * EL + e] = 0;
      }
    }
  }

  out.plan.expert_counts = counts;
  out.plan.expert_offsets = offsets;
  out.plan.row_of_slot = row_of_slot;
  out.plan.total = totals[0];
  out.plan.dropped = totals[1];
  out.plan.invalid = totals[2];
  out.plan.slot_of_row.assign(out.slot_of_row_all.begin(), out.slot_of_row_all.begin() + totals[0]);
  return out;
}

// Compares a replay with the reference. Drop by weight: the selection kernel (unchanged by the
// replay) finishes the listed experts, so those are checked as lists (each listed expert's slots
// in slot order with their keys) and everything else against the reference.
void check_replay(const moekit::test::PlanCase& pc, const Inputs& in) {
  INFO(moekit::test::describe(pc.config, pc.tokens));
  const auto c = moekit::ref::resolve(pc.config);
  const auto want = moekit::ref::build_plan(c, pc.tokens, in.indices, in.weights, in.mask);
  ReplayedPlan got;
  try {
    got = replay_plan_kernels(pc.config, pc.tokens, in);
  } catch (const std::out_of_range& e) {
    FAIL(e.what());
  }
  REQUIRE(got.plan.total == want.total);
  REQUIRE(got.plan.dropped == want.dropped);
  REQUIRE(got.plan.invalid == want.invalid);
  REQUIRE(got.plan.expert_counts == want.expert_counts);
  REQUIRE(got.plan.expert_offsets == want.expert_offsets);
  for (int64_t r = want.total; r < static_cast<int64_t>(got.slot_of_row_all.size()); ++r)
    REQUIRE(got.slot_of_row_all[r] == -7);  // rows past the total are never written
  const int64_t N = pc.tokens * c.top_k;
  const int cap = c.capacity > 0 ? c.capacity : INT_MAX;
  std::vector<bool> listed_expert(c.num_local, false);
  if (c.drop_by_weight) {
    int32_t list_start = 0;
    for (int e = 0; e < c.num_local; ++e) {
      REQUIRE(got.raw_counts[e] >= want.expert_counts[e]);
      REQUIRE(got.list_offsets[e] == list_start);
      if (got.raw_counts[e] > cap) {
        listed_expert[e] = true;
        list_start += got.raw_counts[e];
      }
    }
  }
  std::vector<int32_t> list_fill(c.num_local, 0);
  for (int64_t s = 0; s < N; ++s) {
    const bool real = in.mask.empty() || in.mask[s / c.top_k] != 0;
    const int64_t id = in.indices[s];
    const bool routed = real && id >= c.expert_begin && id < c.expert_begin + c.num_local;
    const int e = routed ? static_cast<int>(id - c.expert_begin) : -1;
    INFO("slot " << s);
    if (routed && listed_expert[e]) {
      const int32_t entry = got.list_offsets[e] + list_fill[e]++;
      REQUIRE(got.list_slots[entry] == s);  // slot order inside the list
      REQUIRE(got.list_keys[entry] == kt::weight_key(in.weights[s]));
    } else {
      REQUIRE(got.plan.row_of_slot[s] == want.row_of_slot[s]);
      if (want.row_of_slot[s] >= 0) REQUIRE(got.plan.slot_of_row[want.row_of_slot[s]] == s);
    }
  }
  for (int e = 0; e < c.num_local; ++e)
    if (listed_expert[e]) REQUIRE(list_fill[e] == got.raw_counts[e]);
  for (int e = 0; e < c.num_local; ++e)  // padding rows are the sentinel
    for (int32_t r = want.expert_offsets[e] + want.expert_counts[e]; r < want.expert_offsets[e + 1]; ++r)
      REQUIRE(got.plan.slot_of_row[r] == -1);
}

}  // namespace

TEST_CASE("the plan kernels' index arithmetic replayed on the host", "[tokens][plan][replay]") {
  auto rng = moekit::test::make_rng(0x70d1);
  for (const auto& pc : moekit::test::plan_case_grid()) check_replay(pc, make_inputs(rng, pc, true));
  // The GPU suite's large cases (several tiles per block, E_local = 4096 with few blocks, lists of
  // thousands) and the benchmark shapes, where the grid has 16 to 128 blocks.
  const int pos = MOEKIT_DROP_BY_POSITION, wt = MOEKIT_DROP_BY_WEIGHT;
  const std::vector<moekit::test::PlanCase> large = {
      {16384, plan_config(256, 8), Routing::kDistinct, 0, 1},
      {4096, plan_config(256, 8), Routing::kDistinct, 0, 1},
      {8192, plan_config(8, 2), Routing::kDistinct, 0, 1},
      {16384, plan_config(128, 8), Routing::kDistinct, 0, 1},
      {16384, plan_config(256, 8, 128), Routing::kSkewed, 0, 0.95},
      {70000, plan_config(64, 8, 8), Routing::kAny, 0.001, 0.9},
      {20000, plan_config(4096, 8, 1), Routing::kDistinct, 0, 1},
      {20000, plan_config(6000, 8, 8, 0, pos, 1904, 4096), Routing::kDistinct, 0.01, 1},
      {30000, plan_config(600, 8, 4), Routing::kSkewed, 0, 1},    // E_local in (256, 4096): 2 columns a thread
      {5000, plan_config(1000, 8, 2), Routing::kAny, 0, 1},
      {16384, plan_config(256, 8, 8, 400, wt), Routing::kSkewed, 0, 1},
      {40000, plan_config(16, 4, 1, 3000, wt), Routing::kDistinct, 0, 1},
      {50000, plan_config(2, 1, 1, 1, wt), Routing::kOneHot, 0, 1},
      {200000, plan_config(1, 1), Routing::kOneHot, 0, 1},          // one expert: 98 blocks, 1 bit of label
      {40000, plan_config(200, 8, 8), Routing::kSkewed, 0, 1},      // 79 blocks: several table batches
      {40000, plan_config(128, 8), Routing::kDistinct, 0, 0.9},
  };
  for (const auto& pc : large) check_replay(pc, make_inputs(rng, pc, true));
}

TEST_CASE("plan grids keep the table small and cover every slot once", "[tokens][plan][replay]") {
  for (int64_t N : {int64_t(0), int64_t(1), int64_t(4095), int64_t(4096), int64_t(4097), int64_t(131072),
                    int64_t(1) << 20, int64_t(INT32_MAX)})
    for (int EL : {1, 7, 255, 256, 257, 1000, 4096}) {
      INFO("N=" << N << " E_local=" << EL);
      const kt::PlanGrid g = kt::plan_grid(N, EL);
      REQUIRE(g.blocks >= 1);
      REQUIRE(g.blocks <= kt::kPlanMaxBlocks);
      REQUIRE(g.blocks <= 132);  // resident at once on an H100 or H200: the one-launch path
      // The bar's shape: 128 blocks of one tile, 16-bit table entries.
      if (N == 131072 && EL == 256) REQUIRE((g.blocks == 128 && kt::plan_table_is_narrow(g.slots_per_block)));
      REQUIRE(static_cast<int64_t>(g.blocks) * (EL + 1) <= std::max<int64_t>(kt::kPlanMaxTableEntries, EL + 1));
      REQUIRE(g.slots_per_block % kt::kPlanTileSlots == 0);
      REQUIRE(static_cast<int64_t>(g.blocks) * g.slots_per_block >= N);
      if (N > 0) REQUIRE(static_cast<int64_t>(g.blocks - 1) * g.slots_per_block < N);  // no empty block
      // The scatter kernel's table loads: parts * E_local threads at most, batches of whole rows.
      const int parts = kt::column_parts(EL, g.blocks);
      REQUIRE(parts >= 1);
      REQUIRE((EL >= kt::kPlanThreads || parts * EL <= kt::kPlanThreads));
      const int rows = kt::table_rows_per_batch(g.blocks);
      REQUIRE(kt::kPlanTableBatch % rows == 0);
    }
  REQUIRE(kt::label_bits(1) == 2);
  REQUIRE(kt::label_bits(256) == 9);
  REQUIRE(kt::label_bits(4096) == 13);
  REQUIRE(kt::count_aggregates(8));     // mixtral: groups of equal labels are common
  REQUIRE(kt::count_aggregates(62));
  REQUIRE(!kt::count_aggregates(63));
  REQUIRE(!kt::count_aggregates(256));
}
