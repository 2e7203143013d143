#include "trainer/router.h"

#include <algorithm>
#include <cmath>

#include "common/random.h"

namespace switchyard::trainer {

RouterOptions RouterOptions::FromModel(const config::ModelConfig& m) {
  RouterOptions o;
  o.num_experts = m.num_experts();
  o.top_k = m.top_k();
  o.capacity_factor = m.capacity_factor();
  o.aux_loss_alpha = m.aux_loss_alpha();
  o.z_loss = m.router_z_loss();
  o.jitter = m.router_jitter();
  return o;
}

RouterOptions RouterOptions::ForEvaluation(
    const config::SwitchyardConfig& config) {
  RouterOptions o = FromModel(config.model());
  o.capacity_factor = config.training().eval_capacity_factor();
  return o;
}

std::vector<float> JitterMultipliers(uint64_t seed, int64_t step, int rank,
                                     int micro_batch, int layer, int tokens,
                                     int d, double eps) {
  constexpr uint64_t kTagJitter = 11;
  std::vector<float> out(static_cast<size_t>(tokens) * d);
  for (int t = 0; t < tokens; ++t) {
    for (int i = 0; i < d; ++i) {
      const double u = RandomUniform(
          seed,
          {kTagJitter, static_cast<uint64_t>(step), static_cast<uint64_t>(rank),
           static_cast<uint64_t>(micro_batch), static_cast<uint64_t>(layer),
           static_cast<uint64_t>(t), static_cast<uint64_t>(i)});
      out[static_cast<size_t>(t) * d + i] =
          static_cast<float>(1.0 - eps + 2.0 * eps * u);
    }
  }
  return out;
}

template <typename Real>
RouterState<Real> RouteForward(const RouterOptions& o, const Real* x,
                               int tokens, int d, const Real* w,
                               const float* jitter) {
  const int E = o.num_experts, k = o.top_k, T = tokens;
  RouterState<Real> s;
  s.tokens = T;
  s.experts = E;
  s.k = k;
  s.x.assign(x, x + static_cast<size_t>(T) * d);
  if (jitter != nullptr) {
    for (size_t i = 0; i < s.x.size(); ++i) s.x[i] *= jitter[i];
  }
  s.logits.assign(static_cast<size_t>(T) * E, Real(0));
  s.probs.assign(static_cast<size_t>(T) * E, Real(0));
  for (int t = 0; t < T; ++t) {
    Real* lg = &s.logits[static_cast<size_t>(t) * E];
    for (int i = 0; i < d; ++i) {
      const Real xi = s.x[static_cast<size_t>(t) * d + i];
      const Real* wr = w + static_cast<size_t>(i) * E;
      for (int e = 0; e < E; ++e) lg[e] += xi * wr[e];
    }
    const Real m = *std::max_element(lg, lg + E);
    Real sum = 0;
    Real* p = &s.probs[static_cast<size_t>(t) * E];
    for (int e = 0; e < E; ++e) sum += (p[e] = std::exp(lg[e] - m));
    for (int e = 0; e < E; ++e) p[e] /= sum;
    const Real lse = m + std::log(sum);
    s.z_loss += lse * lse;
  }
  s.z_loss = T > 0 ? Real(o.z_loss) * s.z_loss / T : Real(0);

  // Top-k per token, best first; ties go to the lower index.
  s.expert.assign(static_cast<size_t>(T) * k, 0);
  s.gate.assign(static_cast<size_t>(T) * k, Real(0));
  s.kept.assign(static_cast<size_t>(T) * k, 1);
  std::vector<int> order(E);
  for (int t = 0; t < T; ++t) {
    const Real* p = &s.probs[static_cast<size_t>(t) * E];
    for (int e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(
        order.begin(), order.begin() + k, order.end(),
        [p](int a, int b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    Real chosen_sum = 0;
    for (int j = 0; j < k; ++j) chosen_sum += p[order[j]];
    for (int j = 0; j < k; ++j) {
      s.expert[static_cast<size_t>(t) * k + j] = order[j];
      s.gate[static_cast<size_t>(t) * k + j] =
          k == 1 ? p[order[j]] : p[order[j]] / chosen_sum;
    }
  }

  // Capacity: choice rank j for all tokens before j + 1, tokens in order.
  s.load.assign(E, 0);
  s.first_choice_count.assign(E, 0);
  for (int t = 0; t < T; ++t)
    ++s.first_choice_count[s.expert[static_cast<size_t>(t) * k]];
  if (o.capacity_factor > 0 && T > 0) {
    // At most T * k: a larger factor (any finite one) changes nothing.
    s.capacity = static_cast<int>(
        std::min(std::ceil(o.capacity_factor * T * k / static_cast<double>(E)),
                 static_cast<double>(T) * k));
  }
  for (int j = 0; j < k; ++j) {
    for (int t = 0; t < T; ++t) {
      const size_t idx = static_cast<size_t>(t) * k + j;
      const int e = s.expert[idx];
      if (s.capacity > 0 && s.load[e] >= s.capacity) {
        s.kept[idx] = 0;
        s.gate[idx] = 0;
        ++s.dropped;
      } else {
        ++s.load[e];
      }
    }
  }

  // Switch load-balancing loss.
  if (T > 0 && o.aux_loss_alpha > 0) {
    Real total = 0;
    for (int e = 0; e < E; ++e) {
      Real mean_p = 0;
      for (int t = 0; t < T; ++t)
        mean_p += s.probs[static_cast<size_t>(t) * E + e];
      mean_p /= T;
      total += (Real(s.first_choice_count[e]) / T) * mean_p;
    }
    s.aux_loss = Real(o.aux_loss_alpha) * E * total;
  }
  return s;
}

template <typename Real>
void RouteBackward(const RouterOptions& o, const RouterState<Real>& s,
                   const Real* d_gate, Real loss_scale, int d, const Real* w,
                   const float* jitter, Real* dx, Real* dw) {
  const int T = s.tokens, E = s.experts, k = s.k;
  std::vector<Real> d_probs(static_cast<size_t>(T) * E, Real(0));
  for (int t = 0; t < T; ++t) {
    const Real* p = &s.probs[static_cast<size_t>(t) * E];
    Real* dp = &d_probs[static_cast<size_t>(t) * E];
    const size_t base = static_cast<size_t>(t) * k;
    // A dropped assignment's gate is the constant 0.
    auto dg = [&](int j) {
      return s.kept[base + j] ? d_gate[base + j] : Real(0);
    };
    if (k == 1) {
      dp[s.expert[base]] += dg(0);
    } else {
      // g_j = p_j / S over the k choices (before dropping).
      Real S = 0;
      for (int j = 0; j < k; ++j) S += p[s.expert[base + j]];
      Real dot = 0;  // sum_j dg_j * g_j
      for (int j = 0; j < k; ++j) dot += dg(j) * (p[s.expert[base + j]] / S);
      for (int j = 0; j < k; ++j) dp[s.expert[base + j]] += (dg(j) - dot) / S;
    }
    if (o.aux_loss_alpha > 0) {
      for (int e = 0; e < E; ++e) {
        dp[e] += loss_scale * Real(o.aux_loss_alpha) * E *
                 (Real(s.first_choice_count[e]) / T) / T;
      }
    }
  }
  // Softmax backward, plus the z-loss gradient on logits.
  std::vector<Real> d_logits(static_cast<size_t>(T) * E);
  for (int t = 0; t < T; ++t) {
    const Real* p = &s.probs[static_cast<size_t>(t) * E];
    const Real* dp = &d_probs[static_cast<size_t>(t) * E];
    const Real* lg = &s.logits[static_cast<size_t>(t) * E];
    Real dot = 0;
    for (int e = 0; e < E; ++e) dot += p[e] * dp[e];
    Real lse = 0;
    if (o.z_loss > 0) {
      const Real m = *std::max_element(lg, lg + E);
      Real sum = 0;
      for (int e = 0; e < E; ++e) sum += std::exp(lg[e] - m);
      lse = m + std::log(sum);
    }
    Real* dl = &d_logits[static_cast<size_t>(t) * E];
    for (int e = 0; e < E; ++e) {
      dl[e] = p[e] * (dp[e] - dot);
      if (o.z_loss > 0)
        dl[e] += loss_scale * Real(o.z_loss) * 2 * lse * p[e] / T;
    }
  }
  // dW = x^T dlogits; dx = (dlogits W^T) * jitter.
  std::fill(dw, dw + static_cast<size_t>(d) * E, Real(0));
  for (int t = 0; t < T; ++t) {
    const Real* dl = &d_logits[static_cast<size_t>(t) * E];
    for (int i = 0; i < d; ++i) {
      const Real xi = s.x[static_cast<size_t>(t) * d + i];
      const Real* wr = w + static_cast<size_t>(i) * E;
      Real* dwr = dw + static_cast<size_t>(i) * E;
      Real acc = 0;
      for (int e = 0; e < E; ++e) {
        dwr[e] += xi * dl[e];
        acc += dl[e] * wr[e];
      }
      const size_t idx = static_cast<size_t>(t) * d + i;
      dx[idx] = jitter != nullptr ? acc * jitter[idx] : acc;
    }
  }
}

template RouterState<float> RouteForward<float>(const RouterOptions&,
                                                const float*, int, int,
                                                const float*, const float*);
template RouterState<double> RouteForward<double>(const RouterOptions&,
                                                  const double*, int, int,
                                                  const double*, const float*);
template void RouteBackward<float>(const RouterOptions&,
                                   const RouterState<float>&, const float*,
                                   float, int, const float*, const float*,
                                   float*, float*);
template void RouteBackward<double>(const RouterOptions&,
                                    const RouterState<double>&, const double*,
                                    double, int, const double*, const float*,
                                    double*, double*);

}  // namespace switchyard::trainer
