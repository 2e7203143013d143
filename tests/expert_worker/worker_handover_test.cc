// Live moves between two workers (a join, a drain): the epoch that
// continues from a step boundary names a moved shard's old home
// (RoutingEntry.moved_from), which hands the shard's parameters and
// optimizer state at that step over on the data plane (kShardHandover);
// training then goes on with the shard at its new home, bit-identical to a
// worker that kept every shard.
#include <gtest/gtest.h>

#include <future>
#include <memory>
#include <string>
#include <vector>

#include "common/metrics.h"
#include "common/shard_ref.h"
#include "expert_worker/worker_service.h"
#include "tests/expert_worker/worker_test_util.h"
#include "transport/local/in_process_data_plane.h"

namespace switchyard::expert_worker::worker_testing {
namespace {

// The table of kEpoch + 1 that continues from `step` with expert 1's
// shards moved from "w" to "v".
control::RoutingTable MoveExpertOne(const std::string& w_address,
                                    const std::string& v_address,
                                    int64_t step) {
  control::RoutingTable t = Routing(kEpoch + 1);
  t.mutable_workers(0)->set_data_address(w_address);
  auto* v = t.add_workers();
  v->set_name("v");
  v->set_data_address(v_address);
  t.set_continues(true);
  t.set_resume_step(step);
  for (auto& e : *t.mutable_entries()) {
    if (e.shard().kind() == control::EXPERT && e.shard().expert() == 1) {
      e.set_worker(1);
      e.set_moved_from("w");
    }
  }
  return t;
}

// Two workers: "w" hosting every shard at kEpoch and serving its data
// plane, "v" (nothing yet) fetching through its own.
class WorkerHandoverTest : public ::testing::Test {
 protected:
  void StartPair(const config::SwitchyardConfig& config) {
    w_ = std::make_unique<WorkerService>(config, "w");
    v_ = std::make_unique<WorkerService>(config, "v");
    ASSERT_TRUE(w_plane_
                    ->Start([this](Message m, transport::Reply reply) {
                      w_->Handle(std::move(m), std::move(reply));
                    })
                    .ok());
    ASSERT_TRUE(v_plane_->Start(nullptr).ok());
    v_->SetPeerPlane(v_plane_.get());
    ASSERT_TRUE(w_->Start().ok());
    ASSERT_TRUE(v_->Start().ok());
    ASSERT_TRUE(w_->ApplyRouting(Routing(kEpoch)).ok());
  }
  // ShardsPlannedHereAreMadeDuringThePause's run, the move called off or
  // not.
  void MoveAfterAPause(bool called_off);
  void TearDown() override {
    if (v_ != nullptr) v_->Shutdown();
    if (w_ != nullptr) w_->Shutdown();
    v_plane_->Shutdown();
    w_plane_->Shutdown();
  }

  const std::unique_ptr<transport::DataPlane> w_plane_ =
      transport::NewInProcessDataPlane();
  const std::unique_ptr<transport::DataPlane> v_plane_ =
      transport::NewInProcessDataPlane();
  std::unique_ptr<WorkerService> w_, v_;
};

Message Handover(uint64_t epoch, int64_t step, int expert, int shard,
                 int tensor) {
  Message m;
  m.header.kind = static_cast<uint8_t>(MessageKind::kShardHandover);
  m.header.epoch = epoch;
  m.header.step = step;
  m.header.layer = 0;
  m.header.expert = expert;
  m.header.shard = shard;
  m.header.micro_batch = tensor;
  return m;
}

TEST_F(WorkerHandoverTest, AMovedShardIsHandedOverLiveAndTrainsOnBitForBit) {
  constexpr int kMoveAt = 2, kEnd = 4;
  config::SwitchyardConfig config = TestConfig("adamw");
  const std::vector<DigestsByShard> expected = DigestsByStep(config, kEnd);

  ASSERT_NO_FATAL_FAILURE(StartPair(config));
  WorkerService& w = *w_;
  WorkerService& v = *v_;
  TrainSteps(&w, 0, kMoveAt);

  // The new home asks before the old one has the table: its fetches are
  // answered not ready and retried until w hands the shards over.
  const control::RoutingTable move =
      MoveExpertOne(w_plane_->address(), v_plane_->address(), kMoveAt);
  auto taking =
      std::async(std::launch::async, [&] { return v.ApplyRouting(move); });
  EXPECT_EQ(taking.wait_for(Ms(100)), std::future_status::timeout);
  ASSERT_TRUE(w.ApplyRouting(move).ok());
  const Status taken = taking.get();
  ASSERT_TRUE(taken.ok()) << taken.ToString();

  // Each shard is in one place, and the moved ones are what w had.
  EXPECT_EQ(v.hosted(), (std::vector<ShardId>{ShardId::Expert(0, 1, 0),
                                              ShardId::Expert(0, 1, 1)}));
  EXPECT_EQ(w.hosted(), (std::vector<ShardId>{ShardId::Expert(0, 0, 0),
                                              ShardId::Expert(0, 0, 1)}));
  EXPECT_EQ(v.next_step(), kMoveAt);
  EXPECT_EQ(v.open_epoch(), kEpoch + 1);
  for (const auto& [shard, digest] : v.ShardDigests()) {
    EXPECT_EQ(digest, expected[kMoveAt].at(shard)) << shard;
  }

  // What w hands over is served only as asked: the epoch and step of the
  // move, a shard it handed over.
  struct Case {
    Message request;
    StatusCode code;
  };
  const std::vector<Case> cases = {
      {Handover(kEpoch + 1, kMoveAt, 1, 0, 0), StatusCode::kOk},
      {Handover(kEpoch + 1, kMoveAt, 0, 0, 0), StatusCode::kNotFound},
      {Handover(kEpoch + 1, kMoveAt - 1, 1, 0, 0), StatusCode::kNotFound},
      {Handover(kEpoch + 1, kMoveAt, 1, 0, 99), StatusCode::kNotFound},
      {Handover(kEpoch + 2, kMoveAt, 1, 0, 0), StatusCode::kAborted},
      // Nothing was handed over in kEpoch.
      {Handover(kEpoch, kMoveAt, 1, 0, 0), StatusCode::kNotFound},
  };
  for (const Case& c : cases) {
    const Message answer = Ask(&w, c.request);
    EXPECT_EQ(answer.header.status_code, static_cast<int32_t>(c.code))
        << transport::DescribeHeader(c.request.header) << ": "
        << answer.error_text;
  }
  // A hold after the move keeps what was handed over: a new home still
  // fetching under the move's epoch is served.
  control::RoutingTable hold = Routing(kEpoch + 2);
  hold.set_hold(true);
  ASSERT_TRUE(w.ApplyRouting(hold).ok());
  EXPECT_EQ(Ask(&w, Handover(kEpoch + 1, kMoveAt, 1, 0, 0)).header.status_code,
            0);
  // The epoch after the hold continues from the same step, nothing moved.
  control::RoutingTable after =
      MoveExpertOne(w_plane_->address(), v_plane_->address(), kMoveAt);
  after.set_epoch(kEpoch + 3);
  for (auto& e : *after.mutable_entries()) e.clear_moved_from();
  ASSERT_TRUE(w.ApplyRouting(after).ok());
  ASSERT_TRUE(v.ApplyRouting(after).ok());
  // Once every move is in place the copies go.
  w.NoteMovesDone(kEpoch + 1);
  EXPECT_EQ(Ask(&w, Handover(kEpoch + 1, kMoveAt, 1, 0, 0)).header.status_code,
            static_cast<int32_t>(StatusCode::kNotFound));

  // Training goes on with expert 1 at v (under the epoch after the hold):
  // each request to the shard's home, StepDone to both; the end is the
  // one-worker run's, bit for bit.
  for (int step = kMoveAt; step < kEnd; ++step) {
    std::vector<std::vector<Addressed>> per_rank(kRanks);
    for (int r = 0; r < kRanks; ++r) {
      for (Message& m : TrainerStep(step, r)) {
        m.header.epoch = kEpoch + 3;
        const auto kind = static_cast<MessageKind>(m.header.kind);
        if (kind == MessageKind::kStepDone) {
          per_rank[r].emplace_back(&v, m);
          per_rank[r].emplace_back(&w, std::move(m));
          continue;
        }
        const bool at_v = m.header.expert == 1;
        per_rank[r].emplace_back(at_v ? &v : &w, std::move(m));
      }
    }
    for (const auto& answers : AskTogether(std::move(per_rank))) {
      for (const Message& answer : answers) {
        EXPECT_EQ(answer.header.status_code, 0) << answer.error_text;
      }
    }
  }
  DigestsByShard got = w.ShardDigests();
  for (const auto& [shard, digest] : v.ShardDigests()) got[shard] = digest;
  EXPECT_EQ(got, expected[kEnd]);
}

// The table of kEpoch pausing for a move of expert 1's shards to v
// (RoutingEntry.moving_to), or, without `pausing`, the same epoch after
// the move was called off.
control::RoutingTable PauseForExpertOne(const std::string& w_address,
                                        bool pausing) {
  control::RoutingTable pause = Routing(kEpoch);
  pause.mutable_workers(0)->set_data_address(w_address);
  pause.add_workers()->set_name("v");
  pause.set_pause(pausing);
  for (auto& e : *pause.mutable_entries()) {
    if (pausing && e.shard().kind() == control::EXPERT &&
        e.shard().expert() == 1) {
      e.set_moving_to("v");
    }
  }
  return pause;
}

// A pause table that plans expert 1's shards onto v has v make them while
// the trainers finish their step; the move then fills those very shards,
// bit for bit. A pause called off (`called_off`) drops what was made ahead:
// the move after it makes its shards anew.
void WorkerHandoverTest::MoveAfterAPause(bool called_off) {
  constexpr int kMoveAt = 2;
  config::SwitchyardConfig config = TestConfig("adamw");
  const std::vector<DigestsByShard> expected = DigestsByStep(config, kMoveAt);
  ASSERT_NO_FATAL_FAILURE(StartPair(config));
  WorkerService& w = *w_;
  WorkerService& v = *v_;
  const std::string w_address = w_plane_->address();
  TrainSteps(&w, 0, kMoveAt);
  Counter* made_ahead = MetricsRegistry::Global().GetCounter(
      "switchyard_worker_shards_made_ahead_total");
  const uint64_t before = made_ahead->value();

  const auto pause = PauseForExpertOne(w_address, true);
  ASSERT_TRUE(w.ApplyRouting(pause).ok());  // The same epoch: no change.
  ASSERT_TRUE(v.ApplyRouting(pause).ok());
  EXPECT_TRUE(v.hosted().empty());  // Made, not hosted: nothing served.
  if (called_off) {
    ASSERT_TRUE(v.ApplyRouting(PauseForExpertOne(w_address, false)).ok());
  }
  const control::RoutingTable move =
      MoveExpertOne(w_address, v_plane_->address(), kMoveAt);
  ASSERT_TRUE(w.ApplyRouting(move).ok());
  ASSERT_TRUE(v.ApplyRouting(move).ok());
  EXPECT_EQ(made_ahead->value() - before, called_off ? 0u : 2u);
  EXPECT_EQ(v.hosted(), (std::vector<ShardId>{ShardId::Expert(0, 1, 0),
                                              ShardId::Expert(0, 1, 1)}));
  for (const auto& [shard, digest] : v.ShardDigests()) {
    EXPECT_EQ(digest, expected[kMoveAt].at(shard)) << shard;
  }
}

TEST_F(WorkerHandoverTest, ShardsPlannedHereAreMadeDuringThePause) {
  MoveAfterAPause(/*called_off=*/false);
}

TEST_F(WorkerHandoverTest, APauseCalledOffDropsWhatWasMadeAhead) {
  MoveAfterAPause(/*called_off=*/true);
}

// A table that moves a shard here from a worker that does not hand it over
// (it is not the old home) fails after the request deadline, naming the
// shard and the old home; the epoch stays closed to requests (ABORTED).
TEST_F(WorkerHandoverTest, AShardNobodyHandsOverFailsTheTableClearly) {
  config::SwitchyardConfig config = TestConfig("adamw");
  config.mutable_transport()->set_request_timeout_ms(300);
  ASSERT_NO_FATAL_FAILURE(StartPair(config));
  WorkerService& v = *v_;
  // w never sees the move: it stays at kEpoch.
  const Status s = v.ApplyRouting(
      MoveExpertOne(w_plane_->address(), v_plane_->address(), 0));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("fetching L0.E1.S0 from w at"), std::string::npos)
      << s.ToString();
  EXPECT_EQ(v.open_epoch(), 0u);
  Message forward =
      Request(MessageKind::kExpertForward, 0, 0, 0, 1, 0, kEpoch + 1);
  EXPECT_EQ(Ask(&v, std::move(forward)).header.status_code,
            static_cast<int32_t>(StatusCode::kAborted));
}

}  // namespace
}  // namespace switchyard::expert_worker::worker_testing
