// Hot-expert replication's plan and chunks: the plan follows the load with
// hysteresis and bounds, chunks cover every row once, and the plan's
// checkpoint tensor round-trips and refuses what is not a plan.
#include "expert_worker/replication.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace switchyard::expert_worker {
namespace {

config::ReplicationConfig Replication() {
  config::ReplicationConfig r;
  r.set_enabled(true);
  r.set_hot_load(2.0);
  r.set_cool_load(1.25);
  r.set_max_replicas(4);
  return r;
}

TEST(ReplicationTest, PlanFollowsTheLoadWithinItsBounds) {
  const auto r = Replication();
  const double mean = 1000;
  EXPECT_EQ(PlanReplicas(r, 1, 1000, mean), 1) << "the mean expert";
  EXPECT_EQ(PlanReplicas(r, 1, 1999, mean), 1) << "below hot_load";
  EXPECT_EQ(PlanReplicas(r, 1, 2000, mean), 2);
  EXPECT_EQ(PlanReplicas(r, 1, 2001, mean), 3) << "ceil(load)";
  EXPECT_EQ(PlanReplicas(r, 1, 4000, mean), 4);
  EXPECT_EQ(PlanReplicas(r, 1, 8000, mean), 4) << "max_replicas";
  EXPECT_EQ(PlanReplicas(r, 1, 0, mean), 1);
  EXPECT_EQ(PlanReplicas(r, 1, 8000, 0), 1) << "no mean: no plan";
  auto one = r;
  one.set_max_replicas(1);
  EXPECT_EQ(PlanReplicas(one, 1, 8000, mean), 1);
}

TEST(ReplicationTest, AReplicatedShardCoolsOnlyBelowCoolLoad) {
  const auto r = Replication();
  const double mean = 1000;
  EXPECT_EQ(PlanReplicas(r, 3, 1300, mean), 2) << "kept, at least 2";
  EXPECT_EQ(PlanReplicas(r, 2, 1250, mean), 2) << "at cool_load";
  EXPECT_EQ(PlanReplicas(r, 2, 1249, mean), 1) << "below cool_load";
  EXPECT_EQ(PlanReplicas(r, 1, 1300, mean), 1) << "not hot enough to start";
}

TEST(ReplicationTest, ChunksCoverEveryRowOnceInOrder) {
  for (int64_t rows : {0, 1, 2, 7, 128, 1001}) {
    for (int chunks = 1; chunks <= 5; ++chunks) {
      int64_t next = 0;
      for (int c = 0; c < chunks; ++c) {
        const RowRange range = ChunkRows(rows, chunks, c);
        EXPECT_EQ(range.begin, next);
        EXPECT_GE(range.size(), rows / chunks);
        EXPECT_LE(range.size(), rows / chunks + 1);
        next = range.end;
      }
      EXPECT_EQ(next, rows);
    }
  }
}

TEST(ReplicationTest, PlanTensorRoundTripsBeyondFloatPrecision) {
  auto repl = NewReplicationTensor();
  ASSERT_TRUE(repl.ok());
  auto fresh = ReadReplication(*repl, "L0.E1.S0");
  ASSERT_TRUE(fresh.ok()) << fresh.status().ToString();
  EXPECT_EQ(fresh->replicas, 1);
  EXPECT_EQ(fresh->window_tokens, 0);
  // 2^24 + 1 is not an fp32: the split keeps it exact.
  for (int64_t tokens : {int64_t{16777217}, (int64_t{1} << 48) - 1}) {
    WriteReplication({3, tokens}, &*repl);
    auto back = ReadReplication(*repl, "L0.E1.S0");
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(back->replicas, 3);
    EXPECT_EQ(back->window_tokens, tokens);
  }
}

TEST(ReplicationTest, WhatIsNotAPlanIsDataLoss) {
  const auto read = [](std::vector<float> v) {
    auto t = Tensor::Zeros(DType::kF32, {static_cast<int64_t>(v.size())});
    for (size_t i = 0; i < v.size(); ++i) t->f32()[i] = v[i];
    return ReadReplication(*t, "L0.E1.S0").status();
  };
  EXPECT_TRUE(read({2, 0, 5}).ok());
  for (const auto& v : std::vector<std::vector<float>>{
           {0, 0, 0},            // No replica.
           {65, 0, 0},           // More than any plan.
           {1.5f, 0, 0},         // Not a count.
           {2, -1, 0},           // Negative tokens.
           {2, 0, 16777216.0f},  // A digit out of range.
           {2, 0, std::nanf("")},
           std::vector<float>{2, 0}}) {  // The wrong shape.
    const Status s = read(v);
    EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.ToString();
    EXPECT_NE(s.message().find("L0.E1.S0's replication plan"),
              std::string::npos)
        << s.ToString();
  }
}

}  // namespace
}  // namespace switchyard::expert_worker
