// StepGate: which requests a worker serves, defers or refuses, and when
// StepDone completes a step.
#include "expert_worker/step_gate.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace switchyard::expert_worker {
namespace {

constexpr int kTrainers = 3;

transport::WireHeader Header(uint64_t epoch, int64_t step, int32_t rank) {
  transport::WireHeader h;
  h.epoch = epoch;
  h.step = step;
  h.trainer_rank = rank;
  return h;
}

StepGate GateAt(uint64_t epoch, int64_t step) {
  StepGate gate("w", kTrainers);
  gate.Fence(epoch);
  gate.Open(step);
  return gate;
}

TEST(StepGateTest, EpochsOtherThanTheWorkersAreRefusedAsStaleOrNotReady) {
  const StepGate gate = GateAt(5, 0);
  EXPECT_TRUE(gate.CheckEpoch(Header(5, 0, 0)).ok());
  const Status stale = gate.CheckEpoch(Header(4, 0, 0));
  EXPECT_EQ(stale.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(stale.message().find("stale epoch 4"), std::string::npos)
      << stale.ToString();
  // Newer: the worker has not adopted it yet, so the sender retries.
  EXPECT_EQ(gate.CheckEpoch(Header(6, 0, 0)).code(), StatusCode::kAborted);
}

// A newer epoch fences at once: older requests are refused for good, the
// new epoch's are not ready until its shards are in place, and the step in
// flight is abandoned (its StepDone marks and deferred requests).
TEST(StepGateTest, ANewEpochAbandonsTheStepInFlightUntilOpen) {
  StepGate gate = GateAt(5, 7);
  EXPECT_FALSE(gate.MarkDone(7, 0));
  Task deferred;
  deferred.request.header = Header(5, 8, 0);
  gate.Defer(std::move(deferred));
  EXPECT_EQ(gate.Fence(6).size(), 1u);
  EXPECT_EQ(gate.CheckEpoch(Header(5, 7, 0)).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(gate.CheckEpoch(Header(6, 7, 0)).code(), StatusCode::kAborted);
  gate.Open(7);  // Back at the same step (a rollback to it).
  EXPECT_TRUE(gate.CheckEpoch(Header(6, 7, 0)).ok());
  EXPECT_EQ(gate.next_step(), 7);
  // Rank 0's StepDone of the abandoned step no longer counts.
  for (int rank = 1; rank < kTrainers; ++rank) {
    EXPECT_FALSE(gate.MarkDone(7, rank));
  }
  EXPECT_TRUE(gate.MarkDone(7, 0));
}

TEST(StepGateTest, ServesTheCurrentStepDefersTheNextRefusesTheRest) {
  const StepGate gate = GateAt(1, 7);
  struct Case {
    int64_t step;
    int32_t rank;
    StepGate::Verdict verdict;
    StatusCode code;  // Of the refusal.
  };
  const std::vector<Case> cases = {
      {7, 0, StepGate::Verdict::kServe, StatusCode::kOk},
      {7, kTrainers - 1, StepGate::Verdict::kServe, StatusCode::kOk},
      {8, 0, StepGate::Verdict::kDefer, StatusCode::kOk},
      {6, 0, StepGate::Verdict::kRefuse, StatusCode::kFailedPrecondition},
      {0, 0, StepGate::Verdict::kRefuse, StatusCode::kFailedPrecondition},
      {9, 0, StepGate::Verdict::kRefuse, StatusCode::kFailedPrecondition},
      {7, kTrainers, StepGate::Verdict::kRefuse, StatusCode::kInvalidArgument},
      {7, -1, StepGate::Verdict::kRefuse, StatusCode::kInvalidArgument},
  };
  for (const Case& c : cases) {
    Status why;
    EXPECT_EQ(gate.Admit(Header(1, c.step, c.rank), &why), c.verdict)
        << "step " << c.step << " rank " << c.rank;
    EXPECT_EQ(why.code(), c.code) << "step " << c.step << " rank " << c.rank;
  }
}

TEST(StepGateTest, TheLastRanksStepDoneCompletesTheStepOnce) {
  StepGate gate = GateAt(1, 0);
  EXPECT_FALSE(gate.MarkDone(0, 2));
  EXPECT_FALSE(gate.MarkDone(0, 2)) << "a repeated StepDone counts once";
  EXPECT_FALSE(gate.MarkDone(0, 0));
  EXPECT_TRUE(gate.MarkDone(0, 1));
  // The step's count starts afresh (a retried step after a failed update).
  EXPECT_FALSE(gate.MarkDone(0, 1));
}

TEST(StepGateTest, AdvanceHandsBackDeferredRequestsInArrivalOrder) {
  StepGate gate = GateAt(1, 3);
  for (int32_t rank : {2, 0, 1}) {
    Task task;
    task.request.header = Header(1, 4, rank);
    gate.Defer(std::move(task));
  }
  EXPECT_EQ(gate.num_deferred(), 3u);
  const std::vector<Task> ready = gate.Advance();
  EXPECT_EQ(gate.next_step(), 4);
  EXPECT_EQ(gate.num_deferred(), 0u);
  ASSERT_EQ(ready.size(), 3u);
  EXPECT_EQ(ready[0].request.header.trainer_rank, 2);
  EXPECT_EQ(ready[1].request.header.trainer_rank, 0);
  EXPECT_EQ(ready[2].request.header.trainer_rank, 1);
  Status why;
  EXPECT_EQ(gate.Admit(ready[0].request.header, &why),
            StepGate::Verdict::kServe);
}

// A shard's forward of a micro-batch is computed once every rank's has
// come: Gather hands them back together, in rank order, whatever order
// they came in; a rank's second request is refused and left with the
// caller. Requests of another micro-batch, kind or shard gather apart.
TEST(StepGateTest, GatherHandsBackEveryRanksRequestInRankOrder) {
  StepGate gate = GateAt(1, 3);
  auto forward = [](int32_t rank, int32_t micro_batch, int32_t expert) {
    Task task;
    task.request.header = Header(1, 3, rank);
    task.request.header.kind =
        static_cast<uint8_t>(transport::MessageKind::kExpertForward);
    task.request.header.micro_batch = micro_batch;
    task.request.header.expert = expert;
    return task;
  };
  for (int32_t rank : {2, 0}) {
    Task t = forward(rank, 0, 0);
    auto gathered = gate.Gather(&t);
    ASSERT_TRUE(gathered.ok());
    EXPECT_TRUE(gathered->empty());
  }
  Task other_mb = forward(1, 1, 0), other_expert = forward(1, 0, 1);
  EXPECT_TRUE(gate.Gather(&other_mb)->empty());
  EXPECT_TRUE(gate.Gather(&other_expert)->empty());
  Task dup = forward(2, 0, 0);
  auto refused = gate.Gather(&dup);
  EXPECT_EQ(refused.status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(dup.request.header.trainer_rank, 2);  // Still the caller's.
  Task last = forward(1, 0, 0);
  auto all = gate.Gather(&last);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 3u);
  for (int32_t rank = 0; rank < kTrainers; ++rank) {
    EXPECT_EQ((*all)[rank].request.header.trainer_rank, rank);
  }
  // Shutdown (or a new epoch) hands back the two still gathering.
  EXPECT_EQ(gate.TakeDeferred().size(), 2u);
}

// A gather whose other ranks never came (they finished the step without
// it) is handed back when the step is applied, to be refused as late.
TEST(StepGateTest, AdvanceHandsBackGathersOfTheAppliedStep) {
  StepGate gate = GateAt(1, 3);
  Task stale;
  stale.request.header = Header(1, 3, 0);
  ASSERT_TRUE(gate.Gather(&stale)->empty());
  const std::vector<Task> back = gate.Advance();
  ASSERT_EQ(back.size(), 1u);
  Status why;
  EXPECT_EQ(gate.Admit(back[0].request.header, &why),
            StepGate::Verdict::kRefuse);
  EXPECT_NE(why.message().find("step 3 is already applied"), std::string::npos)
      << why.ToString();
  EXPECT_TRUE(gate.TakeDeferred().empty());
}

}  // namespace
}  // namespace switchyard::expert_worker
