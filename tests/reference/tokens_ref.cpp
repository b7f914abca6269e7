#include "tests/reference/tokens_ref.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace moekit::ref {

TokenPlanConfig resolve(const moekit_plan_config_t& config) {
  TokenPlanConfig c;
  c.num_experts = config.num_experts;
  c.top_k = config.top_k;
  c.expert_begin = config.local_expert_begin;
  c.num_local = config.num_local_experts != 0 ? config.num_local_experts
                                               : config.num_experts - config.local_expert_begin;
  c.alignment = config.alignment;
  c.capacity = config.capacity;
  c.drop_by_weight = config.capacity > 0 && config.drop_policy == MOEKIT_DROP_BY_WEIGHT;
  return c;
}

bool weight_ranks_before(float a, int64_t sa, float b, int64_t sb) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return nb;            // a number ranks before NaN
  if (!na && a != b) return a > b;    // -0 == +0 falls through to the slot
  return sa < sb;
}

namespace {

// Local expert of a slot, -1 for no row, -2 for an invalid id.
int classify(const TokenPlanConfig& c, const std::vector<int32_t>& indices,
             const std::vector<uint8_t>& mask, int64_t slot) {
  const int64_t t = slot / c.top_k;
  if (!mask.empty() && mask[t] == 0) return -1;
  const int64_t id = indices[slot];
  if (id < 0 || id >= c.num_experts) return -2;
  if (id < c.expert_begin || id >= static_cast<int64_t>(c.expert_begin) + c.num_local) return -1;
  return static_cast<int>(id - c.expert_begin);
}

int64_t round_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

}  // namespace

TokenPlan build_plan(const TokenPlanConfig& c, int64_t num_tokens,
                     const std::vector<int32_t>& indices, const std::vector<float>& weights,
                     const std::vector<uint8_t>& mask) {
  const int64_t n_slots = num_tokens * c.top_k;
  std::vector<std::vector<int64_t>> routed(c.num_local);
  TokenPlan p;
  for (int64_t s = 0; s < n_slots; ++s) {
    const int e = classify(c, indices, mask, s);
    if (e == -2) ++p.invalid;
    if (e >= 0) routed[e].push_back(s);
  }
  std::vector<std::vector<int64_t>> kept(c.num_local);
  for (int e = 0; e < c.num_local; ++e) {
    std::vector<int64_t> list = routed[e];
    if (c.capacity > 0 && static_cast<int64_t>(list.size()) > c.capacity) {
      if (c.drop_by_weight) {
        std::sort(list.begin(), list.end(), [&](int64_t a, int64_t b) {
          return weight_ranks_before(weights[a], a, weights[b], b);
        });
        list.resize(c.capacity);
        std::sort(list.begin(), list.end());
      } else {
        list.resize(c.capacity);
      }
    }
    p.dropped += static_cast<int32_t>(routed[e].size() - list.size());
    kept[e] = list;
  }
  p.expert_counts.resize(c.num_local);
  p.expert_offsets.resize(c.num_local + 1);
  p.row_of_slot.assign(n_slots, -1);
  int64_t offset = 0;
  for (int e = 0; e < c.num_local; ++e) {
    p.expert_offsets[e] = static_cast<int32_t>(offset);
    p.expert_counts[e] = static_cast<int32_t>(kept[e].size());
    for (size_t i = 0; i < kept[e].size(); ++i) {
      p.row_of_slot[kept[e][i]] = static_cast<int32_t>(offset + i);
    }
    offset += round_up(static_cast<int64_t>(kept[e].size()), c.alignment);
  }
  p.expert_offsets[c.num_local] = static_cast<int32_t>(offset);
  p.total = static_cast<int32_t>(offset);
  p.slot_of_row.assign(offset, -1);
  for (int64_t s = 0; s < n_slots; ++s)
    if (p.row_of_slot[s] >= 0) p.slot_of_row[p.row_of_slot[s]] = static_cast<int32_t>(s);
  return p;
}

std::string check_plan(const TokenPlanConfig& c, int64_t num_tokens,
                       const std::vector<int32_t>& indices, const std::vector<float>& weights,
                       const std::vector<uint8_t>& mask, const TokenPlan& p) {
  std::ostringstream why;
  const int64_t n_slots = num_tokens * c.top_k;
  if (static_cast<int>(p.expert_counts.size()) != c.num_local ||
      static_cast<int>(p.expert_offsets.size()) != c.num_local + 1 ||
      static_cast<int64_t>(p.row_of_slot.size()) != n_slots ||
      static_cast<int64_t>(p.slot_of_row.size()) != p.total)
    return "array sizes do not match the config";
  // Offsets: start at 0, aligned, segment = roundup(count, A), last = total.
  if (p.expert_offsets[0] != 0) return "expert_offsets[0] != 0";
  for (int e = 0; e < c.num_local; ++e) {
    if (p.expert_offsets[e] % c.alignment != 0) {
      why << "expert_offsets[" << e << "] = " << p.expert_offsets[e] << " is not a multiple of "
          << c.alignment;
      return why.str();
    }
    if (p.expert_counts[e] < 0 || (c.capacity > 0 && p.expert_counts[e] > c.capacity)) {
      why << "expert_counts[" << e << "] = " << p.expert_counts[e] << " out of range";
      return why.str();
    }
    if (p.expert_offsets[e + 1] - p.expert_offsets[e] != round_up(p.expert_counts[e], c.alignment)) {
      why << "segment " << e << " has " << p.expert_offsets[e + 1] - p.expert_offsets[e]
          << " rows for count " << p.expert_counts[e];
      return why.str();
    }
  }
  if (p.expert_offsets[c.num_local] != p.total) return "expert_offsets[E_local] != total";

  // Every routed slot: a row inside its expert's real rows, or dropped; slot order kept.
  int64_t invalid = 0, routed_total = 0, with_row = 0;
  std::vector<std::vector<int64_t>> routed(c.num_local);
  for (int64_t s = 0; s < n_slots; ++s) {
    const int e = classify(c, indices, mask, s);
    const int32_t r = p.row_of_slot[s];
    if (e == -2) ++invalid;
    if (e < 0) {
      if (r != -1) {
        why << "slot " << s << " has no expert but row " << r;
        return why.str();
      }
      continue;
    }
    ++routed_total;
    routed[e].push_back(s);
    if (r == -1) continue;
    ++with_row;
    if (r < p.expert_offsets[e] || r >= p.expert_offsets[e] + p.expert_counts[e]) {
      why << "slot " << s << " of expert " << e << " has row " << r << " outside its real rows ["
          << p.expert_offsets[e] << ", " << p.expert_offsets[e] + p.expert_counts[e] << ")";
      return why.str();
    }
    if (p.slot_of_row[r] != s) {
      why << "slot_of_row[" << r << "] = " << p.slot_of_row[r] << " but row_of_slot[" << s
          << "] = " << r;
      return why.str();
    }
  }
  if (invalid != p.invalid) {
    why << "invalid = " << p.invalid << ", expected " << invalid;
    return why.str();
  }
  if (routed_total - with_row != p.dropped) {
    why << "dropped = " << p.dropped << " but " << routed_total - with_row
        << " routed slots have no row";
    return why.str();
  }
  for (int e = 0; e < c.num_local; ++e) {
    const int64_t n = static_cast<int64_t>(routed[e].size());
    const int64_t expect_kept = c.capacity > 0 ? std::min<int64_t>(n, c.capacity) : n;
    if (p.expert_counts[e] != expect_kept) {
      why << "expert_counts[" << e << "] = " << p.expert_counts[e] << " but " << n
          << " slots are routed (capacity " << c.capacity << ")";
      return why.str();
    }
    // Kept rows in slot order, densely numbered from the segment start.
    int32_t next_row = p.expert_offsets[e];
    for (int64_t s : routed[e]) {
      const int32_t r = p.row_of_slot[s];
      if (r == -1) continue;
      if (r != next_row) {
        why << "expert " << e << ": slot " << s << " has row " << r << ", expected " << next_row
            << " (slot order broken)";
        return why.str();
      }
      ++next_row;
    }
    // The capacity policy chose the right slots.
    if (expect_kept < n) {
      if (!c.drop_by_weight) {
        for (int64_t i = 0; i < n; ++i)
          if ((p.row_of_slot[routed[e][i]] != -1) != (i < expect_kept)) {
            why << "expert " << e << ": drop by position kept the wrong slot " << routed[e][i];
            return why.str();
          }
      } else {
        // The ranking is a strict total order: the last kept must rank before the first dropped.
        int64_t last_kept = -1, first_dropped = -1;
        for (int64_t s : routed[e]) {
          if (p.row_of_slot[s] != -1) {
            if (last_kept < 0 || weight_ranks_before(weights[last_kept], last_kept, weights[s], s))
              last_kept = s;
          } else if (first_dropped < 0 ||
                     weight_ranks_before(weights[s], s, weights[first_dropped], first_dropped)) {
            first_dropped = s;
          }
        }
        if (last_kept >= 0 && first_dropped >= 0 &&
            !weight_ranks_before(weights[last_kept], last_kept, weights[first_dropped], first_dropped)) {
          why << "expert " << e << ": kept slot " << last_kept << " (w " << weights[last_kept]
              << ") ranks after dropped slot " << first_dropped << " (w " << weights[first_dropped]
              << ")";
          return why.str();
        }
      }
    }
    for (int64_t r = p.expert_offsets[e] + p.expert_counts[e]; r < p.expert_offsets[e + 1]; ++r)
      if (p.slot_of_row[r] != -1) {
        why << "padding row " << r << " has slot " << p.slot_of_row[r];
        return why.str();
      }
  }
  return "";
}

void permute(const TokenPlan& plan, int top_k, int64_t num_tokens, int64_t hidden,
             const std::vector<double>& x, const std::vector<double>& weights,
             std::vector<double>* xp, std::vector<double>* row_weights) {
  (void)num_tokens;
  xp->assign(static_cast<size_t>(plan.total) * hidden, 0.0);
  if (row_weights) row_weights->assign(plan.total, 0.0);
  for (int64_t r = 0; r < plan.total; ++r) {
    const int64_t s = plan.slot_of_row[r];
    if (s < 0) continue;
    const int64_t t = s / top_k;
    for (int64_t h = 0; h < hidden; ++h) (*xp)[r * hidden + h] = x[t * hidden + h];
    if (row_weights && !weights.empty()) (*row_weights)[r] = weights[s];
  }
}

std::vector<double> combine(const TokenPlan& plan, int top_k, int64_t num_tokens, int64_t hidden,
                            const std::vector<double>& yp, const std::vector<double>& weights) {
  std::vector<double> y(static_cast<size_t>(num_tokens) * hidden, 0.0);
  for (int64_t t = 0; t < num_tokens; ++t)
    for (int k = 0; k < top_k; ++k) {
      const int64_t s = t * top_k + k;
      const int64_t r = plan.row_of_slot[s];
      if (r < 0) continue;
      const double w = weights.empty() ? 1.0 : weights[s];
      for (int64_t h = 0; h < hidden; ++h) y[t * hidden + h] += w * yp[r * hidden + h];
    }
  return y;
}

void permute_backward(const TokenPlan& plan, int top_k, int64_t num_tokens, int64_t hidden,
                      const std::vector<double>& dxp, const std::vector<double>& d_row_weights,
                      std::vector<double>* dx, std::vector<double>* dw) {
  *dx = combine(plan, top_k, num_tokens, hidden, dxp, {});
  if (dw) {
    dw->assign(static_cast<size_t>(num_tokens) * top_k, 0.0);
    if (!d_row_weights.empty())
      for (int64_t s = 0; s < num_tokens * top_k; ++s)
        if (plan.row_of_slot[s] >= 0) (*dw)[s] = d_row_weights[plan.row_of_slot[s]];
  }
}

void combine_backward(const TokenPlan& plan, int top_k, int64_t num_tokens, int64_t hidden,
                      const std::vector<double>& dy, const std::vector<double>& weights,
                      const std::vector<double>& yp, std::vector<double>* dyp,
                      std::vector<double>* dw, std::vector<double>* dw_scale) {
  if (dyp) dyp->assign(static_cast<size_t>(plan.total) * hidden, 0.0);
  if (dw) dw->assign(static_cast<size_t>(num_tokens) * top_k, 0.0);
  if (dw_scale) dw_scale->assign(static_cast<size_t>(num_tokens) * top_k, 0.0);
  for (int64_t t = 0; t < num_tokens; ++t)
    for (int k = 0; k < top_k; ++k) {
      const int64_t s = t * top_k + k;
      const int64_t r = plan.row_of_slot[s];
      if (r < 0) continue;
      const double w = weights.empty() ? 1.0 : weights[s];
      double dot = 0.0, scale = 0.0;
      for (int64_t h = 0; h < hidden; ++h) {
        const double g = dy[t * hidden + h];
        if (dyp) (*dyp)[r * hidden + h] = w * g;
        if (!yp.empty()) {
          dot += g * yp[r * hidden + h];
          scale += std::fabs(g * yp[r * hidden + h]);
        }
      }
      if (dw) (*dw)[s] = dot;
      if (dw_scale) (*dw_scale)[s] = scale;
    }
}

}  // namespace moekit::ref
