#include "tests/reference/ep_ref.hpp"

#include <algorithm>

namespace moekit::ref {

int ep_owner(const EpProblem& p, int32_t e) {
  if (e < 0 || e >= p.num_experts) return -1;
  return e / (p.num_experts / p.num_ranks);
}

EpExchange ep_exchange(const EpProblem& p) {
  const int n = p.num_ranks, K = p.top_k, C = p.num_chunks;
  EpExchange x;
  x.chunk_capacity = p.capacity_mode ? (p.capacity + C - 1) / C : 0;
  x.dests.resize(n);
  x.row_at.resize(n);
  x.rows.resize(n);
  x.sent.assign(n, std::vector<int64_t>(n, 0));
  x.dropped.assign(n, 0);
  for (int r = 0; r < n; ++r) {
    const int64_t T = p.num_tokens[r];
    x.dests[r].resize(T);
    x.row_at[r].resize(T);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int>& ds = x.dests[r][t];
      if (!p.masks[r].empty() && p.masks[r][t] == 0) continue;
      for (int k = 0; k < K; ++k) {
        const int o = ep_owner(p, p.indices[r][t * K + k]);
        if (o >= 0 && std::find(ds.begin(), ds.end(), o) == ds.end()) ds.push_back(o);
      }
      std::sort(ds.begin(), ds.end());
      x.row_at[r][t].assign(ds.size(), -1);
    }
  }
  // Every destination takes its sources in rank order, each source's tokens chunk by chunk in
  // token order.
  for (int d = 0; d < n; ++d) {
    if (p.capacity_mode) x.rows[d].assign(static_cast<size_t>(n) * C * x.chunk_capacity, EpRecvRow{});
    for (int s = 0; s < n; ++s) {
      const int64_t T = p.num_tokens[s];
      const int64_t L = (T + C - 1) / C;
      for (int c = 0; c < C; ++c) {
        int64_t pos = 0;
        for (int64_t t = std::min<int64_t>(c * L, T); t < std::min<int64_t>((c + 1) * L, T); ++t) {
          const std::vector<int>& ds = x.dests[s][t];
          const auto it = std::find(ds.begin(), ds.end(), d);
          if (it == ds.end()) continue;
          const size_t j = static_cast<size_t>(it - ds.begin());
          if (!p.capacity_mode) {
            x.row_at[s][t][j] = static_cast<int64_t>(x.rows[d].size());
            x.rows[d].push_back(EpRecvRow{s, t});
            ++x.sent[s][d];
          } else if (pos < x.chunk_capacity) {
            const int64_t row = (static_cast<int64_t>(s) * C + c) * x.chunk_capacity + pos;
            x.row_at[s][t][j] = row;
            x.rows[d][row] = EpRecvRow{s, t};
            ++x.sent[s][d];
          } else {
            ++x.dropped[s];
          }
          ++pos;
        }
      }
    }
  }
  return x;
}

std::vector<float> ep_combine(const EpProblem& p, const EpExchange& x, int rank, int64_t hidden,
                              const std::vector<std::vector<float>>& partials) {
  const int64_t T = p.num_tokens[rank];
  std::vector<float> y(static_cast<size_t>(T * hidden), 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<int>& ds = x.dests[rank][t];
    for (int64_t h = 0; h < hidden; ++h) {
      float s = 0.0f;
      for (size_t j = 0; j < ds.size(); ++j) {
        const int64_t row = x.row_at[rank][t][j];
        if (row < 0) continue;
        s += partials[ds[j]][row * hidden + h];
      }
      y[t * hidden + h] = s;
    }
  }
  return y;
}

std::vector<float> ep_grad_weights(const EpProblem& p, const EpExchange& x, int rank,
                                   const std::vector<std::vector<float>>& grad_recv_weights) {
  const int K = p.top_k;
  const int64_t T = p.num_tokens[rank];
  std::vector<float> gw(static_cast<size_t>(T * K), 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<int>& ds = x.dests[rank][t];
    for (int k = 0; k < K; ++k) {
      const int o = ep_owner(p, p.indices[rank][t * K + k]);
      const auto it = std::find(ds.begin(), ds.end(), o);
      if (o < 0 || it == ds.end()) continue;  // invalid id or masked token
      const int64_t row = x.row_at[rank][t][static_cast<size_t>(it - ds.begin())];
      if (row < 0) continue;                  // dropped
      gw[t * K + k] = grad_recv_weights[o][row * K + k];
    }
  }
  return gw;
}

}  // namespace moekit::ref
