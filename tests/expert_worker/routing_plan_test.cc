// PlanRouting: what a routing table means for one worker.
#include "expert_worker/routing_plan.h"

#include <gtest/gtest.h>

#include <set>

namespace switchyard::expert_worker {
namespace {

// Workers "a" and "b"; `a_experts` expert shards L0.E<e>.S0 and dense D0 on
// a, expert L0.E9.S0 and D1 on b.
control::RoutingTable Table(const std::set<int>& a_experts,
                            int64_t resume_step) {
  control::RoutingTable t;
  t.set_epoch(3);
  t.set_resume_step(resume_step);
  t.add_workers()->set_name("a");
  t.add_workers()->set_name("b");
  auto add = [&](control::ShardKind kind, int expert, int shard, int worker) {
    auto* e = t.add_entries();
    e->mutable_shard()->set_kind(kind);
    e->mutable_shard()->set_layer(0);
    e->mutable_shard()->set_expert(expert);
    e->mutable_shard()->set_shard(shard);
    e->set_worker(worker);
  };
  for (int e : a_experts) add(control::EXPERT, e, 0, 0);
  add(control::EXPERT, 9, 0, 1);
  add(control::DENSE, 0, 0, 0);
  add(control::DENSE, 0, 1, 1);
  return t;
}

std::set<ShardId> Experts(const std::set<int>& experts) {
  std::set<ShardId> ids;
  for (int e : experts) ids.insert(ShardId::Expert(0, e, 0));
  return ids;
}

TEST(RoutingPlanTest, AFreshRunMakesItsOwnShardsWithInitialValues) {
  const RoutingPlan plan = PlanRouting(Table({1, 2}, 0), "a", {}, {}, 0);
  EXPECT_EQ(plan.experts, Experts({1, 2}));
  EXPECT_EQ(plan.dense, std::set<int>({0}));
  EXPECT_EQ(plan.make_experts, Experts({1, 2}));
  EXPECT_EQ(plan.make_dense, std::set<int>({0}));
  EXPECT_FALSE(plan.restore);
  EXPECT_FALSE(plan.rolls_back);
}

TEST(RoutingPlanTest, AWorkerNotInTheTableHostsNothing) {
  const RoutingPlan plan =
      PlanRouting(Table({1}, 0), "c", Experts({1}), {0}, 4);
  EXPECT_TRUE(plan.experts.empty());
  EXPECT_TRUE(plan.dense.empty());
  EXPECT_TRUE(plan.make_experts.empty());
}

TEST(RoutingPlanTest, AtTheResumeStepOnlyNewShardsAreMadeAndMovedOnesLeft) {
  const RoutingPlan plan =
      PlanRouting(Table({2, 3}, 5), "a", Experts({1, 2}), {0}, 5);
  EXPECT_EQ(plan.experts, Experts({2, 3}));
  EXPECT_EQ(plan.make_experts, Experts({3}));
  EXPECT_TRUE(plan.make_dense.empty());
  EXPECT_TRUE(plan.restore);
  EXPECT_FALSE(plan.rolls_back);
}

TEST(RoutingPlanTest, AResumedRunRestoresBeforeItsFirstUpdate) {
  // At start: everything is made and restored.
  RoutingPlan plan = PlanRouting(Table({1, 2}, 10), "a", {}, {}, 0);
  EXPECT_TRUE(plan.restore);
  EXPECT_EQ(plan.make_experts, Experts({1, 2}));
  // Handed one more shard at the resume step: only it is loaded.
  plan = PlanRouting(Table({1, 2, 3}, 10), "a", Experts({1, 2}), {0}, 10);
  EXPECT_TRUE(plan.restore);
  EXPECT_EQ(plan.make_experts, Experts({3}));
  EXPECT_TRUE(plan.make_dense.empty());
  // The same table with nothing new: nothing to do.
  plan = PlanRouting(Table({1, 2}, 10), "a", Experts({1, 2}), {0}, 10);
  EXPECT_FALSE(plan.restore);
  EXPECT_TRUE(plan.make_experts.empty());
}

TEST(RoutingPlanTest, AWorkerThatTrainedElsewhereReloadsEverything) {
  // A worker at step 0 that already hosts shards (initial values) and is
  // told the run resumes at 10: every shard it hosts is reloaded.
  const RoutingPlan plan =
      PlanRouting(Table({1, 2}, 10), "a", Experts({1, 2}), {0}, 0);
  EXPECT_TRUE(plan.restore);
  EXPECT_EQ(plan.make_experts, Experts({1, 2}));
  EXPECT_EQ(plan.make_dense, std::set<int>({0}));
}

// A new epoch while training (a member died or joined): every worker
// rolls back to the resume step, every shard it hosts, kept or new.
TEST(RoutingPlanTest, PastTheResumeStepEveryShardRollsBack) {
  const RoutingPlan plan =
      PlanRouting(Table({1, 2}, 10), "a", Experts({1}), {0}, 12);
  EXPECT_TRUE(plan.restore);
  EXPECT_TRUE(plan.rolls_back);
  EXPECT_EQ(plan.make_experts, Experts({1, 2}));
  EXPECT_EQ(plan.make_dense, std::set<int>({0}));
}

TEST(RoutingPlanTest, ARollbackWithNoCommitStartsAgainFromInitialValues) {
  const RoutingPlan plan =
      PlanRouting(Table({1, 2}, 0), "a", Experts({1, 2}), {0}, 7);
  EXPECT_FALSE(plan.restore);
  EXPECT_TRUE(plan.rolls_back);
  EXPECT_EQ(plan.make_experts, Experts({1, 2}));
}

// A live move (a `continues` epoch): shards naming their old home are
// handed over, neither restored nor initialised; the worker that gives
// them up keeps the rest; a worker that holds nothing yet (a joiner) does
// not roll back, whatever step its gate is at.
TEST(RoutingPlanTest, ALiveMoveTakesMovedShardsFromTheirOldHome) {
  control::RoutingTable t = Table({1, 2}, 40);
  t.set_continues(true);
  t.mutable_entries(1)->set_moved_from("b");  // L0.E2.S0: b -> a.
  t.mutable_entries(2)->set_worker(0);        // L0.E9.S0: b -> a.
  t.mutable_entries(2)->set_moved_from("b");
  // The joiner a, at step 0 with nothing.
  RoutingPlan plan = PlanRouting(t, "a", {}, {}, 0);
  EXPECT_FALSE(plan.rolls_back);
  EXPECT_EQ(plan.make_experts, Experts({1, 2, 9}));
  EXPECT_EQ(plan.handover_experts, Experts({2, 9}));
  EXPECT_TRUE(plan.handover_dense.empty());
  EXPECT_TRUE(plan.restore) << "E1 and D0 have no old home here";
  // a holding E1 and D0 at the step: only the moved shards are made.
  plan = PlanRouting(t, "a", Experts({1}), {0}, 40);
  EXPECT_EQ(plan.make_experts, Experts({2, 9}));
  EXPECT_EQ(plan.handover_experts, Experts({2, 9}));
  EXPECT_FALSE(plan.restore);
  // The old home keeps D1 only.
  plan = PlanRouting(t, "b", Experts({2, 9}), {1}, 40);
  EXPECT_TRUE(plan.experts.empty());
  EXPECT_EQ(plan.dense, std::set<int>({1}));
  EXPECT_TRUE(plan.make_experts.empty());
  EXPECT_FALSE(plan.restore);
  // Not a continuing epoch (a rollback): moved_from means nothing.
  t.set_continues(false);
  plan = PlanRouting(t, "a", Experts({1}), {0}, 40);
  EXPECT_TRUE(plan.handover_experts.empty());
  EXPECT_TRUE(plan.restore);
}

}  // namespace
}  // namespace switchyard::expert_worker
