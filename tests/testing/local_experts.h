// Test helper: the experts of every MoE layer held in memory and computed
// with the reference FFN (trainer/layers.h), so that whole-model gradient
// checks run in double. Header-only.
#ifndef SWITCHYARD_TESTS_TESTING_LOCAL_EXPERTS_H_
#define SWITCHYARD_TESTS_TESTING_LOCAL_EXPERTS_H_

#include <map>
#include <utility>
#include <vector>

#include "trainer/layers.h"
#include "trainer/model.h"

namespace switchyard::testing {

template <typename Real>
class LocalExperts : public trainer::MoeExperts<Real> {
 public:
  // Per (layer, expert): W1 (d, g*f), b1 (g*f), W2 (f, d), b2 (d).
  LocalExperts(int layers, int experts, int d, int f, int activation)
      : experts_(experts),
        d_(d),
        f_(f),
        g_(activation == 2 ? 2 : 1),
        activation_(activation),
        params(static_cast<size_t>(layers) * experts * Stride()),
        grads(params.size()) {}

  size_t Stride() const {
    return static_cast<size_t>(d_) * g_ * f_ + g_ * f_ +
           static_cast<size_t>(f_) * d_ + d_;
  }
  // Offsets of expert (layer, e)'s tensors in params / grads.
  size_t W1(int layer, int e) const {
    return (static_cast<size_t>(layer) * experts_ + e) * Stride();
  }
  size_t B1(int l, int e) const { return W1(l, e) + d_ * g_ * f_; }
  size_t W2(int l, int e) const { return B1(l, e) + g_ * f_; }
  size_t B2(int l, int e) const { return W2(l, e) + f_ * d_; }

  Status Forward(int layer, int micro_batch, bool train, const Real* x,
                 const trainer::RouterState<Real>& route, Real* y) override {
    Saved s;
    s.gate = route.gate;
    s.k = route.k;
    s.rows.resize(experts_);
    for (int t = 0; t < route.tokens; ++t) {
      for (int j = 0; j < route.k; ++j) {
        if (route.kept[t * route.k + j])
          s.rows[route.expert[t * route.k + j]].push_back({t, j});
      }
    }
    std::fill(y, y + static_cast<size_t>(route.tokens) * d_, Real(0));
    s.x.resize(experts_);
    s.out.resize(experts_);
    s.cache.resize(experts_);
    for (int e = 0; e < experts_; ++e) {
      const int n = static_cast<int>(s.rows[e].size());
      if (n == 0) continue;
      for (auto [t, j] : s.rows[e])
        s.x[e].insert(s.x[e].end(), x + t * d_, x + (t + 1) * d_);
      s.out[e].resize(static_cast<size_t>(n) * d_);
      trainer::FfnForward(s.x[e].data(), &params[W1(layer, e)],
                          &params[B1(layer, e)], &params[W2(layer, e)],
                          &params[B2(layer, e)], n, d_, f_, activation_,
                          s.out[e].data(), &s.cache[e]);
      for (int r = 0; r < n; ++r) {
        const auto [t, j] = s.rows[e][r];
        for (int i = 0; i < d_; ++i)
          y[t * d_ + i] += s.gate[t * s.k + j] * s.out[e][r * d_ + i];
      }
    }
    if (train) saved_[{layer, micro_batch}] = std::move(s);
    return OkStatus();
  }

  Status Backward(int layer, int micro_batch, int tokens, const Real* dy,
                  Real* dx, Real* d_gate) override {
    Saved& s = saved_.at({layer, micro_batch});
    std::fill(dx, dx + static_cast<size_t>(tokens) * d_, Real(0));
    std::fill(d_gate, d_gate + static_cast<size_t>(tokens) * s.k, Real(0));
    for (int e = 0; e < experts_; ++e) {
      const int n = static_cast<int>(s.rows[e].size());
      if (n == 0) continue;
      std::vector<Real> dye(static_cast<size_t>(n) * d_), dxe(dye.size());
      for (int r = 0; r < n; ++r) {
        const auto [t, j] = s.rows[e][r];
        Real dot = 0;
        for (int i = 0; i < d_; ++i) {
          dye[r * d_ + i] = s.gate[t * s.k + j] * dy[t * d_ + i];
          dot += dy[t * d_ + i] * s.out[e][r * d_ + i];
        }
        d_gate[t * s.k + j] = dot;
      }
      trainer::FfnBackward(s.x[e].data(), &params[W1(layer, e)],
                           &params[W2(layer, e)], n, d_, f_, activation_,
                           &s.cache[e], dye.data(), dxe.data(),
                           &grads[W1(layer, e)], &grads[B1(layer, e)],
                           &grads[W2(layer, e)], &grads[B2(layer, e)]);
      for (int r = 0; r < n; ++r) {
        const int t = s.rows[e][r].first;
        for (int i = 0; i < d_; ++i) dx[t * d_ + i] += dxe[r * d_ + i];
      }
    }
    return OkStatus();
  }

 private:
  struct Saved {
    int k = 0;
    std::vector<Real> gate;
    std::vector<std::vector<std::pair<int, int>>> rows;  // per expert
    std::vector<std::vector<Real>> x, out;               // per expert
    std::vector<trainer::FfnCache<Real>> cache;
  };
  const int experts_, d_, f_, g_, activation_;
  std::map<std::pair<int, int>, Saved> saved_;

 public:
  std::vector<Real> params;
  std::vector<Real> grads;
};

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_TESTING_LOCAL_EXPERTS_H_
