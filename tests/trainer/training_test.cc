// The training loop through the single-process reference: a learnable task
// is learned, runs repeat bit for bit, and routing edge cases train.
#include "trainer/training.h"

#include <gtest/gtest.h>

#include <cmath>
#include <sstream>

#include "reference/reference.h"

namespace switchyard::trainer {
namespace {

config::SwitchyardConfig SmallConfig() {
  config::SwitchyardConfig config;
  auto* m = config.mutable_model();
  m->set_num_layers(2);
  m->set_d_model(32);
  m->set_d_ff(64);
  m->set_num_heads(2);
  m->set_seq_len(16);
  m->set_num_experts(4);
  m->set_dense_shards(2);
  auto* t = config.mutable_training();
  t->set_steps(60);
  t->set_batch_size(8);
  t->set_learning_rate(0.01);
  t->set_warmup_steps(5);
  t->set_log_every(20);
  t->set_eval_every(0);
  t->set_threads(1);
  config.mutable_cluster()->set_trainers(2);
  return config;
}

// A cyclic byte sequence: each byte determines the next, so a model that
// learns anything drives the loss towards 0.
ByteCorpus CyclicCorpus() {
  std::string text;
  for (int i = 0; i < 4000; ++i) text += "abcdefghijklmnopqrstuvwxyz"[i % 26];
  return ByteCorpus::FromText(text, 0.1, 16).value();
}

StatusOr<reference::ReferenceResult> RunRef(
    const config::SwitchyardConfig& config, const ByteCorpus& corpus,
    std::string* output) {
  TrainingOptions options;
  options.sample_bytes = 0;
  std::ostringstream out;
  auto r = reference::RunReference(config, corpus, options, nullptr, out);
  if (output != nullptr) *output = out.str();
  return r;
}

TEST(TrainingTest, LearnsASyntheticTask) {
  const ByteCorpus corpus = CyclicCorpus();
  std::string output;
  auto r = RunRef(SmallConfig(), corpus, &output);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_GT(r->training.first_loss, 5.0) << "starts near ln 256 = 5.55";
  EXPECT_LT(r->training.last_loss, 0.5) << output;
  EXPECT_LT(r->training.validation_loss, 0.5) << output;
  EXPECT_NE(output.find("step 60/60 loss"), std::string::npos) << output;
  EXPECT_NE(output.find("per step (ms): pull"), std::string::npos) << output;
}

TEST(TrainingTest, RunsRepeatBitForBit) {
  config::SwitchyardConfig config = SmallConfig();
  config.mutable_training()->set_steps(8);
  config.mutable_training()->set_micro_batches(2);
  config.mutable_model()->set_top_k(2);
  config.mutable_model()->set_router_jitter(0.05);
  const ByteCorpus corpus = CyclicCorpus();
  auto a = RunRef(config, corpus, nullptr);
  auto b = RunRef(config, corpus, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->digests, b->digests);
  // A different seed gives different parameters: the digests see them.
  config.mutable_training()->set_seed(99);
  auto c = RunRef(config, corpus, nullptr);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(a->digests, c->digests);
}

TEST(TrainingTest, ExpertDropoutIsAppliedAndRepeatable) {
  config::SwitchyardConfig config = SmallConfig();
  config.mutable_training()->set_steps(30);
  const ByteCorpus corpus = CyclicCorpus();
  auto plain = RunRef(config, corpus, nullptr);
  config.mutable_model()->set_expert_dropout(0.3);
  auto a = RunRef(config, corpus, nullptr);
  auto b = RunRef(config, corpus, nullptr);
  ASSERT_TRUE(plain.ok() && a.ok() && b.ok());
  EXPECT_EQ(a->digests, b->digests);
  // Expert shards train differently with dropout; it still learns.
  EXPECT_NE(a->digests.at("L0.E0.S0"), plain->digests.at("L0.E0.S0"));
  EXPECT_LT(a->training.last_loss, a->training.first_loss - 1.0);
}

// learning_rate 1e30 diverges at once: the run stops at the first
// non-finite loss with an error naming the step, rank and micro-batch,
// instead of training on (and committing) NaN.
TEST(TrainingTest, ADivergedRunStopsAtTheFirstNonFiniteLoss) {
  config::SwitchyardConfig config = SmallConfig();
  config.mutable_training()->set_steps(20);
  config.mutable_training()->set_warmup_steps(0);
  config.mutable_training()->set_learning_rate(1e30);
  auto r = RunRef(config, CyclicCorpus(), nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("non-finite"), std::string::npos)
      << r.status().ToString();
  EXPECT_NE(r.status().message().find(", rank "), std::string::npos)
      << r.status().ToString();
  EXPECT_NE(r.status().message().find("training.learning_rate"),
            std::string::npos)
      << r.status().ToString();
}

struct EdgeCase {
  std::string name;
  int top_k = 1;
  double capacity_factor = 0;
  int seq_len = 16;
};

class TrainingEdgeTest : public ::testing::TestWithParam<EdgeCase> {};

std::string EdgeName(const ::testing::TestParamInfo<EdgeCase>& info) {
  return info.param.name;
}

TEST_P(TrainingEdgeTest, TrainsAndLowersTheLoss) {
  const EdgeCase& c = GetParam();
  config::SwitchyardConfig config = SmallConfig();
  config.mutable_training()->set_steps(30);
  config.mutable_model()->set_top_k(c.top_k);
  config.mutable_model()->set_capacity_factor(c.capacity_factor);
  config.mutable_model()->set_seq_len(c.seq_len);
  std::string output;
  auto r = RunRef(config, CyclicCorpus(), &output);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_LT(r->training.last_loss, r->training.first_loss - 1.0) << output;
  EXPECT_EQ(r->digests.size(), 4u + 2u);  // 4 experts, 2 dense shards.
}

INSTANTIATE_TEST_SUITE_P(
    Cases, TrainingEdgeTest,
    ::testing::Values(EdgeCase{"k_equals_experts", 4},
                      // ceil(0.01 * 128 / 4) = 1 token per expert.
                      EdgeCase{"capacity_one_token", 1, 0.01},
                      EdgeCase{"sequence_of_one", 2, 0, 1}),
    EdgeName);

// EvaluateText through the reference: whole windows of seq_len + 1 bytes
// at stride seq_len, at most max_windows, batch_size per pass (a shorter
// last pass); with evaluation dropless the loss does not depend on the
// batching, with a capacity it does.
TEST(TrainingTest, EvaluateTextReadsWindowsInBatches) {
  config::SwitchyardConfig config = SmallConfig();
  config.mutable_training()->set_batch_size(2);
  std::string text;
  for (int i = 0; i < 5 * 16 + 1 + 9; ++i) text += static_cast<char>(i * 7);
  auto five = reference::ReferenceTextLoss(config, text, 0);
  ASSERT_TRUE(five.ok()) << five.status().ToString();
  EXPECT_EQ(five->windows, 5);  // 90 bytes: 5 whole windows of 17.
  EXPECT_EQ(five->tokens, 80);
  EXPECT_GT(five->loss, 4.0);  // Random initial parameters: near ln 256.
  auto three = reference::ReferenceTextLoss(config, text, 3);
  ASSERT_TRUE(three.ok());
  EXPECT_EQ(three->windows, 3);
  EXPECT_EQ(three->tokens, 48);
  EXPECT_NE(three->loss, five->loss);
  // Dropless evaluation: the same loss in one pass of 5 windows.
  config::SwitchyardConfig one_pass = config;
  one_pass.mutable_training()->set_batch_size(5);
  auto whole = reference::ReferenceTextLoss(one_pass, text, 0);
  ASSERT_TRUE(whole.ok());
  EXPECT_NEAR(whole->loss, five->loss, 1e-6 * five->loss);
  // With a capacity at evaluation, which tokens an expert keeps depends on
  // the pass: the batching shows.
  config.mutable_training()->set_eval_capacity_factor(0.25);
  one_pass.mutable_training()->set_eval_capacity_factor(0.25);
  auto capped = reference::ReferenceTextLoss(config, text, 0);
  auto capped_whole = reference::ReferenceTextLoss(one_pass, text, 0);
  ASSERT_TRUE(capped.ok() && capped_whole.ok());
  EXPECT_GT(std::abs(capped->loss - capped_whole->loss), 1e-5);
  // Less than one window: an error saying so.
  auto short_text = reference::ReferenceTextLoss(config, text.substr(0, 16), 0);
  EXPECT_EQ(short_text.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(short_text.status().message().find("fewer than one window"),
            std::string::npos);
}

}  // namespace
}  // namespace switchyard::trainer
