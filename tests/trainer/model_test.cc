// The whole model (dense layers, routers and experts) against finite
// differences in fp64, across routing regimes and edge cases.
#include "trainer/model.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>

#include "common/config.h"
#include "tests/testing/gradient_check.h"
#include "tests/testing/local_experts.h"

namespace switchyard::trainer {
namespace {

struct Case {
  std::string name;
  int top_k = 1;
  double capacity_factor = 0;
  int seq_len = 5;
  int batch = 2;
  std::string norm = "rmsnorm";
  std::string positions = "learned";
  std::string activation = "gelu";
  bool one_expert = false;  // Weights that send every token to expert 0.
  bool expect_drops = false;
};

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  return info.param.name;
}

config::SwitchyardConfig TinyConfig(const Case& c) {
  config::SwitchyardConfig config;
  auto* m = config.mutable_model();
  m->set_num_layers(2);
  m->set_moe_every(2);  // Layer 0 dense, layer 1 MoE.
  m->set_d_model(8);
  m->set_d_ff(6);
  m->set_num_heads(2);
  m->set_vocab_size(16);
  m->set_seq_len(5);
  m->set_num_experts(4);
  m->set_top_k(c.top_k);
  m->set_capacity_factor(c.capacity_factor);
  m->set_aux_loss_alpha(0.05);
  m->set_router_z_loss(0.01);
  m->set_norm(c.norm);
  m->set_positions(c.positions);
  m->set_activation(c.activation);
  m->set_init_scale(1.0);
  // The gradient checks difference Evaluate's loss: it must route as
  // training does.
  config.mutable_training()->set_eval_capacity_factor(c.capacity_factor);
  return config;
}

class ModelGradTest : public ::testing::TestWithParam<Case> {};

TEST_P(ModelGradTest, MatchesFiniteDifferences) {
  const Case& c = GetParam();
  const config::SwitchyardConfig config = TinyConfig(c);
  const auto& m = config.model();
  Transformer<double> model(config);
  std::mt19937 rng(7);
  std::normal_distribution<double> normal(0.0, 0.5);
  std::vector<double> params(model.num_params());
  for (const DenseTensor& t : model.layout()) {
    for (int64_t i = 0; i < t.numel(); ++i) {
      params[t.offset + i] = t.init == DenseTensor::Init::kOnes
                                 ? 1.0 + 0.1 * normal(rng)
                                 : normal(rng);
    }
    if (c.one_expert && t.name == "tok_embed") {
      // Feature 0 of every token is large and positive ...
      for (int64_t r = 0; r < t.rows; ++r) params[t.offset + r * t.cols] = 20;
    }
    if (c.one_expert && t.name == "layers.1.router") {
      // ... and sends every token to expert 0.
      params[t.offset] = 40;
    }
  }
  testing::LocalExperts<double> experts(1, m.num_experts(), m.d_model(),
                                        m.d_ff(),
                                        ActivationCode(m.activation()));
  for (double& p : experts.params) p = normal(rng);
  Batch batch;
  batch.batch_size = c.batch;
  batch.seq_len = c.seq_len;
  for (int i = 0; i < c.batch * c.seq_len; ++i) {
    batch.inputs.push_back(static_cast<int32_t>(rng() % m.vocab_size()));
    batch.targets.push_back(static_cast<int32_t>(rng() % m.vocab_size()));
  }

  std::vector<double> grads(params.size(), 0.0);
  auto report = model.TrainStep(params.data(), batch, {3, 0, 0}, 1.0, &experts,
                                grads.data());
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  ASSERT_EQ(report->moe.size(), 1u);
  EXPECT_EQ(report->moe[0].dropped > 0, c.expect_drops)
      << report->moe[0].dropped << " assignments dropped";
  if (c.one_expert) {
    EXPECT_EQ(report->moe[0].load[0], c.batch * c.seq_len);
  }

  auto loss = [&] {
    auto r = model.Evaluate(params.data(), batch, &experts, nullptr);
    return r->loss + r->aux_loss + r->z_loss;
  };
  EXPECT_NEAR(loss(), report->loss + report->aux_loss + report->z_loss, 1e-12);
  const std::vector<double> numeric =
      testing::CentralDifferences(&params, loss, 1e-6);
  int checked = 0;
  for (const DenseTensor& t : model.layout()) {
    for (int64_t i = 0; i < t.numel(); ++i, ++checked) {
      const double want = numeric[t.offset + i];
      EXPECT_NEAR(grads[t.offset + i], want, 1e-6 + 1e-5 * std::fabs(want))
          << t.name << "[" << i << "]";
    }
  }
  const std::vector<double> numeric_experts =
      testing::CentralDifferences(&experts.params, loss, 1e-6);
  for (size_t i = 0; i < numeric_experts.size(); ++i) {
    EXPECT_NEAR(experts.grads[i], numeric_experts[i],
                1e-6 + 1e-5 * std::fabs(numeric_experts[i]))
        << "expert parameter " << i;
  }
  EXPECT_EQ(checked, model.num_params());
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ModelGradTest,
    ::testing::Values(Case{"top1_dropless"}, Case{"top2_dropless", 2},
                      Case{"top1_capacity", 1, 0.5, 5, 2, "rmsnorm", "learned",
                           "gelu", false, true},
                      Case{"top2_capacity", 2, 0.6, 5, 2, "rmsnorm", "learned",
                           "gelu", false, true},
                      // k = E: every expert sees every token.
                      Case{"top4_of_4", 4},
                      // capacity 1 token per expert.
                      Case{"capacity_one_token", 1, 0.01, 5, 2, "rmsnorm",
                           "learned", "gelu", false, true},
                      // Every token to one expert (the others get no tokens).
                      Case{"all_to_one_expert", 1, 0, 5, 2, "rmsnorm",
                           "learned", "gelu", true},
                      Case{"sequence_of_one", 2, 0, 1, 3},
                      Case{"layernorm_rotary_swiglu", 2, 0, 5, 2, "layernorm",
                           "rotary", "swiglu"},
                      Case{"relu", 1, 0, 4, 2, "rmsnorm", "learned", "relu"}),
    CaseName);

TEST(ModelTest, RejectsBatchesThatDoNotFit) {
  const config::SwitchyardConfig config = TinyConfig(Case{});
  Transformer<float> model(config);
  std::vector<float> params(model.num_params(), 0.1f);
  testing::LocalExperts<float> experts(1, 4, 8, 6, 0);
  Batch too_long;
  too_long.batch_size = 1;
  too_long.seq_len = 6;  // seq_len is 5.
  too_long.inputs.assign(6, 1);
  too_long.targets.assign(6, 1);
  auto r = model.Evaluate(params.data(), too_long, &experts, nullptr);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  Batch bad_token = too_long;
  bad_token.seq_len = 5;
  bad_token.inputs.assign(5, 1);
  bad_token.targets.assign(5, 99);  // vocab is 16.
  r = model.Evaluate(params.data(), bad_token, &experts, nullptr);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("vocabulary"), std::string::npos);
}

// Evaluation routes with training.eval_capacity_factor (0: dropless), so a
// sequence's logits do not depend on the sequences beside it in its batch;
// with the training capacity they would (every token to one expert, far
// beyond its capacity of 1).
TEST(ModelTest, EvaluationUsesTheEvalCapacityFactor) {
  Case c;
  c.capacity_factor = 0.01;  // Training capacity: one token per expert.
  c.one_expert = true;
  config::SwitchyardConfig config = TinyConfig(c);
  config.mutable_training()->clear_eval_capacity_factor();  // Dropless.
  std::normal_distribution<float> normal(0, 0.5f);
  auto logits_of_last_sequence = [&](const config::SwitchyardConfig& cfg,
                                     int batch) {
    Transformer<float> model(cfg);
    std::vector<float> params(model.num_params());
    std::mt19937 init(3);
    for (float& p : params) p = normal(init);
    // Every token's first choice is expert 0.
    for (const DenseTensor& t : model.layout()) {
      if (t.name.find("router") == std::string::npos) continue;
      for (int64_t i = 0; i < t.numel(); ++i)
        params[t.offset + i] = (i % t.cols == 0) ? 5.0f : -5.0f;
    }
    testing::LocalExperts<float> experts(1, 4, 8, 6, 0);
    std::mt19937 ew(5);
    for (float& p : experts.params) p = normal(ew);
    Batch b;
    b.batch_size = batch;
    b.seq_len = 5;
    // The sequence compared comes last, after its neighbours' tokens.
    for (int s = batch - 1; s >= 0; --s) {
      for (int i = 0; i < 5; ++i) {
        b.inputs.push_back((i * 7 + 3 * s + 3) % 16);
        b.targets.push_back((i * 5 + s + 1) % 16);
      }
    }
    std::vector<float> logits;
    auto report = model.Evaluate(params.data(), b, &experts, &logits);
    EXPECT_TRUE(report.ok()) << report.status().ToString();
    logits.erase(logits.begin(), logits.end() - 5 * 16);
    return std::make_pair(logits, report.ok() ? report->moe[0].dropped : -1);
  };
  const auto [alone, alone_dropped] = logits_of_last_sequence(config, 1);
  const auto [beside, beside_dropped] = logits_of_last_sequence(config, 3);
  EXPECT_EQ(alone_dropped, 0);
  EXPECT_EQ(beside_dropped, 0);
  EXPECT_EQ(alone, beside);
  // With the training capacity at evaluation too, tokens are dropped and the
  // last sequence's logits change with its neighbours.
  config.mutable_training()->set_eval_capacity_factor(0.01);
  const auto [capped_alone, capped_alone_dropped] =
      logits_of_last_sequence(config, 1);
  const auto [capped_beside, capped_beside_dropped] =
      logits_of_last_sequence(config, 3);
  EXPECT_GT(capped_alone_dropped, 0);
  EXPECT_GT(capped_beside_dropped, capped_alone_dropped);
  EXPECT_NE(capped_alone, capped_beside);
}

}  // namespace
}  // namespace switchyard::trainer
