// The router: semantics (top-k, renormalised gates, capacity, losses) and a
// finite-difference gradient check in double through the whole router.
#include "trainer/router.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>

namespace switchyard::trainer {
namespace {

std::vector<double> Random(std::mt19937& rng, size_t n, double scale) {
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

struct GradCase {
  const char* name;
  int top_k;
  double capacity_factor;
  bool jitter;
};

class RouterGradTest : public ::testing::TestWithParam<GradCase> {};

// L = sum_tj r_tj * gate_tj + aux + z, differentiated by hand (RouteBackward)
// and by central differences.
TEST_P(RouterGradTest, MatchesFiniteDifferences) {
  const GradCase c = GetParam();
  const int T = 7, d = 5, E = 4;
  RouterOptions o;
  o.num_experts = E;
  o.top_k = c.top_k;
  o.capacity_factor = c.capacity_factor;
  o.aux_loss_alpha = 0.1;
  o.z_loss = 0.05;
  std::mt19937 rng(17 + c.top_k);
  std::vector<double> x = Random(rng, T * d, 1.0), w = Random(rng, d * E, 0.7);
  const std::vector<double> r = Random(rng, T * c.top_k, 1.0);
  const std::vector<float> jitter =
      c.jitter ? JitterMultipliers(5, 3, 1, 0, 2, T, d, 0.1)
               : std::vector<float>();
  const float* jp = c.jitter ? jitter.data() : nullptr;
  // The training loss is scaled (1 / (trainers * micro-batches)); the
  // gradient of every term must carry the scale.
  constexpr double kScale = 0.25;
  auto loss = [&](const RouterState<double>& s) {
    double l = s.aux_loss + s.z_loss;
    for (size_t i = 0; i < r.size(); ++i) l += r[i] * s.gate[i];
    return kScale * l;
  };
  const RouterState<double> base =
      RouteForward(o, x.data(), T, d, w.data(), jp);
  if (c.capacity_factor > 0) {
    EXPECT_GT(base.dropped, 0) << "the case should exercise dropping";
  }
  std::vector<double> dx(T * d), dw(d * E);
  std::vector<double> d_gate(r.size());
  for (size_t i = 0; i < r.size(); ++i) d_gate[i] = kScale * r[i];
  RouteBackward(o, base, d_gate.data(), kScale, d, w.data(), jp, dx.data(),
                dw.data());

  auto check = [&](std::vector<double>* v, const std::vector<double>& grad,
                   const char* what) {
    const double h = 1e-6;
    size_t compared = 0;
    for (size_t i = 0; i < v->size(); ++i) {
      const double old = (*v)[i];
      (*v)[i] = old + h;
      const auto up = RouteForward(o, x.data(), T, d, w.data(), jp);
      (*v)[i] = old - h;
      const auto down = RouteForward(o, x.data(), T, d, w.data(), jp);
      (*v)[i] = old;
      // A perturbation that changes a discrete choice has no derivative.
      if (up.expert != base.expert || down.expert != base.expert ||
          up.kept != base.kept || down.kept != base.kept) {
        continue;
      }
      const double fd = (loss(up) - loss(down)) / (2 * h);
      EXPECT_NEAR(grad[i], fd, 1e-6 * std::max(1.0, std::abs(fd)))
          << what << "[" << i << "]";
      ++compared;
    }
    EXPECT_GE(compared * 10, v->size() * 9) << what << ": too few compared";
  };
  check(&x, dx, "dx");
  check(&w, dw, "dw");
}

INSTANTIATE_TEST_SUITE_P(
    Cases, RouterGradTest,
    ::testing::Values(GradCase{"top1_dropless", 1, 0, false},
                      GradCase{"top2_dropless", 2, 0, false},
                      GradCase{"topE", 4, 0, false},
                      GradCase{"top1_capacity", 1, 0.5, true},
                      GradCase{"top2_capacity_jitter", 2, 0.6, true}),
    [](const auto& info) { return std::string(info.param.name); });

RouterOptions Options(int E, int k, double capacity = 0) {
  RouterOptions o;
  o.num_experts = E;
  o.top_k = k;
  o.capacity_factor = capacity;
  return o;
}

TEST(RouterTest, TopOneGateIsTheBestProbability) {
  std::mt19937 rng(1);
  const int T = 9, d = 6, E = 5;
  auto x = Random(rng, T * d, 1.0), w = Random(rng, d * E, 1.0);
  auto s = RouteForward(Options(E, 1), x.data(), T, d, w.data(), nullptr);
  for (int t = 0; t < T; ++t) {
    const double* p = &s.probs[t * E];
    const int best = static_cast<int>(std::max_element(p, p + E) - p);
    EXPECT_EQ(s.expert[t], best);
    EXPECT_DOUBLE_EQ(s.gate[t], p[best]);
    EXPECT_NEAR(std::accumulate(p, p + E, 0.0), 1.0, 1e-12);
  }
}

TEST(RouterTest, TopKGatesAreRenormalisedAndDistinct) {
  std::mt19937 rng(2);
  const int T = 6, d = 4, E = 4;
  auto x = Random(rng, T * d, 1.0), w = Random(rng, d * E, 1.0);
  for (int k : {2, 4}) {  // k = E: every expert, each once.
    auto s = RouteForward(Options(E, k), x.data(), T, d, w.data(), nullptr);
    for (int t = 0; t < T; ++t) {
      double sum = 0;
      std::vector<int> seen;
      for (int j = 0; j < k; ++j) {
        sum += s.gate[t * k + j];
        seen.push_back(s.expert[t * k + j]);
        if (j > 0) {
          EXPECT_GE(s.probs[t * E + s.expert[t * k + j - 1]],
                    s.probs[t * E + s.expert[t * k + j]]);
        }
      }
      std::sort(seen.begin(), seen.end());
      EXPECT_TRUE(std::adjacent_find(seen.begin(), seen.end()) == seen.end());
      EXPECT_NEAR(sum, 1.0, 1e-12);
    }
  }
}

TEST(RouterTest, CapacityDropsLaterTokensAndKeepsTheirResidual) {
  // W routes every token to expert 0: with capacity factor 0.5 over 2
  // experts and 8 tokens, C = ceil(0.5 * 8 / 2) = 2.
  const int T = 8, d = 2, E = 2;
  std::vector<double> x(T * d, 1.0), w = {1.0, -1.0, 1.0, -1.0};
  auto s = RouteForward(Options(E, 1, 0.5), x.data(), T, d, w.data(), nullptr);
  EXPECT_EQ(s.capacity, 2);
  EXPECT_EQ(s.load[0], 2);
  EXPECT_EQ(s.dropped, 6);
  for (int t = 0; t < T; ++t) {
    EXPECT_EQ(s.kept[t], t < 2 ? 1 : 0) << t;  // Token order decides.
    if (t >= 2) {
      EXPECT_EQ(s.gate[t], 0.0);
    }
  }
  // Capacity one token.
  auto one =
      RouteForward(Options(E, 1, 0.1), x.data(), T, d, w.data(), nullptr);
  EXPECT_EQ(one.capacity, 1);
  EXPECT_EQ(one.load[0], 1);
  // Dropless keeps everything.
  auto all = RouteForward(Options(E, 1, 0), x.data(), T, d, w.data(), nullptr);
  EXPECT_EQ(all.dropped, 0);
  EXPECT_EQ(all.load[0], T);
}

TEST(RouterTest, SecondChoicesQueueBehindAllFirstChoices) {
  // Two experts, top-2, capacity factor 0.5: C = ceil(0.5 * 4 * 2 / 2) = 2.
  // Every token prefers expert 0: tokens 0-1 get it as first choice; their
  // second choice (expert 1) comes after the first choices of tokens 2-3.
  const int T = 4, d = 1, E = 2;
  std::vector<double> x(T, 1.0), w = {1.0, 0.0};
  auto s = RouteForward(Options(E, 2, 0.5), x.data(), T, d, w.data(), nullptr);
  EXPECT_EQ(s.capacity, 2);
  // First choices: expert 0 for all; only tokens 0 and 1 fit.
  EXPECT_EQ(s.kept[0 * 2 + 0], 1);
  EXPECT_EQ(s.kept[1 * 2 + 0], 1);
  EXPECT_EQ(s.kept[2 * 2 + 0], 0);
  EXPECT_EQ(s.kept[3 * 2 + 0], 0);
  // Second choices: expert 1, tokens 0 and 1 fill it.
  EXPECT_EQ(s.kept[0 * 2 + 1], 1);
  EXPECT_EQ(s.kept[1 * 2 + 1], 1);
  EXPECT_EQ(s.kept[2 * 2 + 1], 0);
}

TEST(RouterTest, LossValuesForUniformProbabilities) {
  // W = 0: every prob is 1/E, every first choice is expert 0 (tie -> lower
  // index): aux = alpha * E * (1 * 1/E) = alpha; z = beta * log(E)^2.
  const int T = 5, d = 3, E = 4;
  RouterOptions o = Options(E, 1);
  o.aux_loss_alpha = 0.01;
  o.z_loss = 0.001;
  std::vector<double> x(T * d, 0.3), w(d * E, 0.0);
  auto s = RouteForward(o, x.data(), T, d, w.data(), nullptr);
  EXPECT_NEAR(s.aux_loss, 0.01, 1e-15);
  EXPECT_NEAR(s.z_loss, 0.001 * std::log(4.0) * std::log(4.0), 1e-15);
  EXPECT_EQ(s.first_choice_count[0], T);
}

TEST(RouterTest, ZeroTokensAndFloatMatchesDouble) {
  auto empty =
      RouteForward(Options(4, 2, 1.0), static_cast<const double*>(nullptr), 0,
                   3, std::vector<double>(12, 0.1).data(), nullptr);
  EXPECT_EQ(empty.dropped, 0);
  EXPECT_EQ(empty.aux_loss, 0.0);
  std::mt19937 rng(4);
  const int T = 10, d = 8, E = 6;
  auto x = Random(rng, T * d, 1.0), w = Random(rng, d * E, 0.5);
  std::vector<float> xf(x.begin(), x.end()), wf(w.begin(), w.end());
  auto sd = RouteForward(Options(E, 2), x.data(), T, d, w.data(), nullptr);
  auto sf = RouteForward(Options(E, 2), xf.data(), T, d, wf.data(), nullptr);
  EXPECT_EQ(sd.expert, sf.expert);
  for (size_t i = 0; i < sd.gate.size(); ++i) {
    EXPECT_NEAR(sd.gate[i], sf.gate[i], 1e-5);
  }
}

TEST(RouterTest, JitterIsDeterministicAndBounded) {
  auto a = JitterMultipliers(1, 5, 0, 0, 2, 4, 3, 0.01);
  auto b = JitterMultipliers(1, 5, 0, 0, 2, 4, 3, 0.01);
  auto c = JitterMultipliers(1, 6, 0, 0, 2, 4, 3, 0.01);
  auto m = JitterMultipliers(1, 5, 0, 1, 2, 4, 3, 0.01);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(a, m) << "micro-batches of a step need their own noise";
  for (float m : a) {
    EXPECT_GE(m, 0.99f);
    EXPECT_LE(m, 1.01f);
  }
}

}  // namespace
}  // namespace switchyard::trainer
