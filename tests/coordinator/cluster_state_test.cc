// The coordinator's state machine, driven with chosen times.
#include "coordinator/cluster_state.h"

#include <gtest/gtest.h>

#include <limits>
#include <memory>

#include "cli/status_client.h"
#include "common/config.h"

namespace switchyard::coordinator {
namespace {

using control::RegisterRequest;
using std::chrono::milliseconds;

config::SwitchyardConfig TestConfig() {
  auto loaded =
      ParseConfig("", "test",
                  {"cluster.workers=3", "cluster.trainers=2",
                   "cluster.lease_ms=1000", "cluster.heartbeat_ms=200",
                   "model.num_experts=8", "model.dense_shards=2"});
  CHECK(loaded.ok()) << loaded.status().ToString();
  return loaded->config;
}

RegisterRequest Worker(const std::string& name, uint64_t previous = 0) {
  RegisterRequest r;
  r.set_kind(control::WORKER);
  r.set_name(name);
  r.set_capacity_bytes(int64_t{1} << 30);
  r.set_device("cpu");
  r.set_rank(-1);
  r.set_previous_incarnation(previous);
  return r;
}

RegisterRequest Trainer(int rank, const std::string& name = "") {
  RegisterRequest r;
  r.set_kind(control::TRAINER);
  r.set_name(name.empty() ? "trainer-" + std::to_string(rank) : name);
  r.set_rank(rank);
  return r;
}

control::Heartbeat Beat(const std::string& name, uint64_t incarnation) {
  control::Heartbeat b;
  b.set_name(name);
  b.set_incarnation(incarnation);
  return b;
}

// Shard index -> worker name ("" when unplaced).
std::vector<std::string> Homes(const control::RoutingTable& t) {
  std::vector<std::string> homes;
  for (const auto& e : t.entries()) {
    homes.push_back(e.worker() < 0 ? "" : t.workers(e.worker()).name());
  }
  return homes;
}

const control::MemberStatus& Member(const control::StatusResponse& s,
                                    const std::string& name) {
  for (const auto& m : s.members()) {
    if (m.name() == name) return m;
  }
  static control::MemberStatus none;
  ADD_FAILURE() << name << " not in status";
  return none;
}

class ClusterStateTest : public ::testing::Test {
 protected:
  Clock::time_point t0_ = Clock::time_point() + std::chrono::hours(1);
  ClusterState state_{TestConfig()};
  std::map<std::string, uint64_t> incarnation_;

  void RegisterWorkers(int n, Clock::time_point now) {
    for (int i = 0; i < n; ++i) {
      const std::string name = "worker-" + std::to_string(i);
      auto r = state_.Register(Worker(name), now);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      incarnation_[name] = r->incarnation();
    }
  }
  void BeatAll(Clock::time_point now, const std::string& except = "") {
    for (const auto& [name, inc] : incarnation_) {
      if (name != except) {
        ASSERT_TRUE(state_.Heartbeat(Beat(name, inc), now).ok());
      }
    }
  }
};

TEST_F(ClusterStateTest, PlacesOnceTheExpectedWorkersJoin) {
  EXPECT_EQ(state_.epoch(), 1u);
  RegisterWorkers(2, t0_);
  EXPECT_EQ(state_.Routing().entries_size(), 0);
  EXPECT_FALSE(state_.Report(t0_).placed());
  auto r = state_.Register(Worker("worker-2"), t0_);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(state_.epoch(), 2u);
  // The registering worker receives the routing table that includes it.
  EXPECT_EQ(r->routing().epoch(), 2u);
  EXPECT_EQ(r->routing().entries_size(), 2 * 8 + 2);
  const auto status = state_.Report(t0_);
  EXPECT_EQ(status.placed_shards(), status.total_shards());
  for (int i = 0; i < 3; ++i) {
    EXPECT_GT(Member(status, "worker-" + std::to_string(i)).shards(), 0);
  }
}

TEST_F(ClusterStateTest, CheckpointReportWithAnUnknownShardIsRefusedWhole) {
  RegisterWorkers(3, t0_);
  const control::RoutingTable routing = state_.Routing();
  ASSERT_EQ(routing.entries_size(), 2 * 8 + 2);
  auto report = [&](int first, int end, bool unknown) {
    control::CheckpointReport r;
    r.set_name("worker-0");
    r.set_incarnation(incarnation_["worker-0"]);
    r.set_step(5);
    for (int i = first; i < end; ++i) {
      auto* s = r.add_shards();
      *s->mutable_shard() = routing.entries(i).shard();
      s->set_digest("d" + std::to_string(i));
      s->set_bytes(10);
    }
    if (unknown) {
      auto* s = r.add_shards();
      s->mutable_shard()->set_kind(control::EXPERT);
      s->mutable_shard()->set_layer(0);
      s->mutable_shard()->set_expert(99);
      s->mutable_shard()->set_shard(0);
    }
    return state_.ReportCheckpoint(r);
  };
  const int n = routing.entries_size();
  // Every shard but the last, and one the model lacks: refused, and none
  // of it recorded, so the last shard alone commits nothing.
  auto bad = report(0, n - 1, /*unknown=*/true);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  auto last = report(n - 1, n, /*unknown=*/false);
  ASSERT_TRUE(last.ok()) << last.status().ToString();
  EXPECT_EQ(last->committed_step(), 0);
  // The whole report commits step 5.
  auto whole = report(0, n, /*unknown=*/false);
  ASSERT_TRUE(whole.ok()) << whole.status().ToString();
  EXPECT_EQ(whole->committed_step(), 5);
}

TEST_F(ClusterStateTest, ExpiredLeaseFencesAndReplaces) {
  RegisterWorkers(3, t0_);
  const uint64_t epoch = state_.epoch();
  const auto before = Homes(state_.Routing());
  // worker-1 stops heartbeating; the others keep going.
  for (int ms = 200; ms <= 1400; ms += 200) {
    const auto now = t0_ + milliseconds(ms);
    state_.Tick(now);
    for (const auto& [name, inc] : incarnation_) {
      if (name != "worker-1") {
        ASSERT_TRUE(state_.Heartbeat(Beat(name, inc), now).ok()) << ms;
      }
    }
  }
  const auto now = t0_ + milliseconds(1400);
  EXPECT_EQ(Member(state_.Report(now), "worker-1").state(), control::DEAD);
  EXPECT_EQ(state_.epoch(), epoch + 1);
  const auto after = Homes(state_.Routing());
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_NE(after[i], "worker-1");
    EXPECT_NE(after[i], "");
    if (before[i] != "worker-1") {
      EXPECT_EQ(after[i], before[i]);
    }
  }
  // The fenced incarnation can no longer heartbeat.
  auto fenced =
      state_.Heartbeat(Beat("worker-1", incarnation_["worker-1"]), now);
  EXPECT_EQ(fenced.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(fenced.status().message().find("fenced"), std::string::npos);
  // Coming back makes it a new incarnation and a joiner, whose shards move
  // live at a step boundary: with no trainer training, the cluster holds
  // at once, and once the holders report, the next epoch moves them.
  auto back = state_.Register(Worker("worker-1"), now);
  ASSERT_TRUE(back.ok());
  EXPECT_GT(back->incarnation(), incarnation_["worker-1"]);
  EXPECT_EQ(state_.epoch(), epoch + 2);
  EXPECT_TRUE(state_.Routing().hold());
  for (const char* name : {"worker-0", "worker-2"}) {
    control::Heartbeat b = Beat(name, incarnation_[name]);
    b.set_held_epoch(epoch + 2);
    b.set_held_step(0);
    b.set_held_serving(true);
    ASSERT_TRUE(state_.Heartbeat(b, now).ok());
  }
  EXPECT_EQ(state_.epoch(), epoch + 3);
  EXPECT_TRUE(state_.Routing().continues());
  EXPECT_GT(Member(state_.Report(now), "worker-1").shards(), 0);
}

// A coordinator restart alone changes nothing for the members: the same
// epoch (their routing tables stay in force, so training goes on and nothing
// rolls back), the same placement, the same incarnations.
// Every shard's report at `step` from `worker` (digests by shard index).
control::CheckpointReport FullReport(const control::RoutingTable& routing,
                                     const std::string& worker,
                                     uint64_t incarnation, int64_t step) {
  control::CheckpointReport r;
  r.set_name(worker);
  r.set_incarnation(incarnation);
  r.set_step(step);
  for (int i = 0; i < routing.entries_size(); ++i) {
    auto* s = r.add_shards();
    *s->mutable_shard() = routing.entries(i).shard();
    s->set_digest("d" + std::to_string(i) + "@" + std::to_string(step));
    s->set_bytes(10);
  }
  return r;
}

// A worker's death mid-run: the new epoch names the newest committed
// checkpoint as the step every member continues from, with its holders
// and digests, and reports of later steps not yet committed are forgotten
// (the members report them again after training there again).
TEST_F(ClusterStateTest, AWorkersDeathRollsTheClusterBackToTheNewestCommit) {
  RegisterWorkers(3, t0_);
  const control::RoutingTable first = state_.Routing();
  EXPECT_EQ(first.resume_step(), 0);
  ASSERT_TRUE(state_
                  .ReportCheckpoint(FullReport(first, "worker-0",
                                               incarnation_["worker-0"], 10))
                  .ok());
  ASSERT_EQ(state_.Report(t0_).checkpoints_size(), 1);
  // Step 20: every shard but through worker-0 only, not yet committed...
  control::CheckpointReport partial =
      FullReport(first, "worker-0", incarnation_["worker-0"], 20);
  partial.mutable_shards()->RemoveLast();
  ASSERT_TRUE(state_.ReportCheckpoint(partial).ok());
  // ... when worker-2 dies.
  BeatAll(t0_ + milliseconds(900), "worker-2");
  state_.Tick(t0_ + milliseconds(1001));
  const control::RoutingTable after = state_.Routing();
  EXPECT_GT(after.epoch(), first.epoch());
  EXPECT_EQ(after.resume_step(), 10);
  for (const auto& e : after.entries()) {
    EXPECT_EQ(e.resume_holder(), "worker-0");
    EXPECT_FALSE(e.resume_digest().empty());
  }
  // The forgotten half of step 20 does not complete it with the last shard.
  control::CheckpointReport last =
      FullReport(first, "worker-1", incarnation_["worker-1"], 20);
  for (int i = 0; i + 1 < first.entries_size(); ++i) {
    last.mutable_shards()->DeleteSubrange(0, 1);
  }
  auto ack = state_.ReportCheckpoint(last);
  ASSERT_TRUE(ack.ok()) << ack.status().ToString();
  EXPECT_EQ(ack->committed_step(), 0);
  // The operator sees the recovery (and still after a restart).
  for (const auto& report :
       {state_.Report(t0_),
        ClusterState::Restore(TestConfig(), state_.Snapshot(), t0_)
            ->Report(t0_)}) {
    EXPECT_EQ(report.recoveries_total(), 1);
    ASSERT_EQ(report.recoveries_size(), 1);
    EXPECT_EQ(report.recoveries(0).epoch(), after.epoch());
    EXPECT_EQ(report.recoveries(0).resume_step(), 10);
    EXPECT_NE(report.recoveries(0).cause().find("worker-2"), std::string::npos)
        << report.recoveries(0).cause();
  }
}

// A trainer's death abandons the step in flight on every worker: a new
// epoch (a rollback). One that leaves at the run's end changes nothing.
// A trainer's death (or a new trainer incarnation) holds the cluster: an
// epoch whose table says hold, until every worker holding shards has
// reported the step it stopped at; the next epoch continues from the
// furthest of them, nothing rolled back. A trainer that left changes
// nothing.
TEST_F(ClusterStateTest, ATrainersDeathHoldsTheClusterThenItContinues) {
  RegisterWorkers(3, t0_);
  auto t0 = state_.Register(Trainer(0), t0_);
  auto t1 = state_.Register(Trainer(1), t0_);
  ASSERT_TRUE(t0.ok() && t1.ok());
  incarnation_["trainer-0"] = t0->incarnation();
  const uint64_t epoch = state_.epoch();
  control::Leave leave;
  leave.set_name("trainer-1");
  leave.set_incarnation(t1->incarnation());
  ASSERT_TRUE(state_.Leave(leave).ok());
  EXPECT_EQ(state_.epoch(), epoch);
  BeatAll(t0_ + milliseconds(900), "trainer-0");
  state_.Tick(t0_ + milliseconds(1001));
  EXPECT_EQ(Member(state_.Report(t0_), "trainer-0").state(), control::DEAD);
  EXPECT_EQ(state_.epoch(), epoch + 1);
  EXPECT_TRUE(state_.Routing().hold());
  const auto recoveries = state_.Report(t0_).recoveries_total();
  // A restarted trainer within the hold changes nothing more.
  ASSERT_TRUE(state_.Register(Trainer(0), t0_ + milliseconds(1002)).ok());
  EXPECT_EQ(state_.epoch(), epoch + 1);
  // Workers report where they stopped: two applied step 41, one holds its
  // gradients (a trainer died between its StepDones). A report of another
  // epoch counts for nothing.
  const auto held = [&](const std::string& name, uint64_t at, int64_t step) {
    control::Heartbeat b = Beat(name, incarnation_[name]);
    b.set_held_epoch(at);
    b.set_held_step(step);
    b.set_held_serving(true);
    ASSERT_TRUE(state_.Heartbeat(b, t0_ + milliseconds(1100)).ok());
  };
  held("worker-0", epoch + 1, 42);
  held("worker-1", epoch, 41);
  EXPECT_EQ(state_.epoch(), epoch + 1);
  held("worker-1", epoch + 1, 41);
  EXPECT_EQ(state_.epoch(), epoch + 1);
  held("worker-2", epoch + 1, 42);
  const control::RoutingTable table = state_.Routing();
  EXPECT_EQ(table.epoch(), epoch + 2);
  EXPECT_FALSE(table.hold());
  EXPECT_TRUE(table.continues());
  EXPECT_EQ(table.resume_step(), 42);
  EXPECT_EQ(state_.Report(t0_).recoveries_total(), recoveries + 1);
  // The recovery is over once every live trainer trains under its epoch
  // (their heartbeats say so): then it has a duration.
  const auto last = [&] {
    const auto report = state_.Report(t0_);
    return std::make_unique<control::Recovery>(*report.recoveries().rbegin());
  };
  EXPECT_FALSE(last()->rolled_back());
  EXPECT_EQ(last()->resume_step(), 42);
  const auto trains = [&](const std::string& name, uint64_t incarnation,
                          uint64_t at, int64_t step) {
    control::Heartbeat b = Beat(name, incarnation);
    b.set_training_epoch(at);
    b.set_step(step);
    ASSERT_TRUE(state_.Heartbeat(b, t0_ + milliseconds(1150)).ok());
  };
  uint64_t trainer0 = 0;
  const control::StatusResponse members = state_.Report(t0_);
  for (const auto& m : members.members()) {
    if (m.name() == "trainer-0") trainer0 = m.incarnation();
  }
  trains("trainer-0", trainer0, epoch + 1, 42);
  EXPECT_EQ(last()->duration_ms(), 0) << "still the hold's epoch";
  trains("trainer-0", trainer0, epoch + 2, 43);
  EXPECT_GT(last()->duration_ms(), 0);
  // A restarted trainer under a live name fences the old one: a hold.
  ASSERT_TRUE(state_.Register(Trainer(1), t0_ + milliseconds(1200)).ok());
  ASSERT_TRUE(state_.Register(Trainer(1), t0_ + milliseconds(1201)).ok());
  EXPECT_EQ(state_.epoch(), epoch + 3);
  EXPECT_TRUE(state_.Routing().hold());
}

// A coordinator restarted within a hold resumes it: the workers' reports
// (sent with every heartbeat) end it as before.
TEST_F(ClusterStateTest, AHoldSurvivesACoordinatorRestart) {
  RegisterWorkers(3, t0_);
  auto trainer = state_.Register(Trainer(0), t0_);
  ASSERT_TRUE(trainer.ok());
  ASSERT_TRUE(state_.Register(Trainer(0), t0_ + milliseconds(10)).ok());
  const uint64_t hold = state_.epoch();
  ASSERT_TRUE(state_.Routing().hold());
  auto restored = ClusterState::Restore(TestConfig(), state_.Snapshot(),
                                        t0_ + milliseconds(20));
  ASSERT_TRUE(restored.ok()) << restored.status().ToString();
  EXPECT_EQ(restored->epoch(), hold);
  EXPECT_TRUE(restored->Routing().hold());
  for (const char* name : {"worker-0", "worker-1", "worker-2"}) {
    control::RegisterRequest again = Worker(name, incarnation_[name]);
    ASSERT_TRUE(restored->Register(again, t0_ + milliseconds(30)).ok());
    control::Heartbeat b = Beat(name, incarnation_[name]);
    b.set_held_epoch(hold);
    b.set_held_step(7);
    b.set_held_serving(true);
    ASSERT_TRUE(restored->Heartbeat(b, t0_ + milliseconds(40)).ok());
  }
  const control::RoutingTable table = restored->Routing();
  EXPECT_EQ(table.epoch(), hold + 1);
  EXPECT_TRUE(table.continues());
  EXPECT_EQ(table.resume_step(), 7);
}

// A hold whose workers are not one update apart, or one of which was not
// serving its shards, cannot continue: it rolls back to the newest
// committed checkpoint.
TEST_F(ClusterStateTest, AHoldTheWorkersCannotContinueRollsBack) {
  RegisterWorkers(3, t0_);
  auto t0 = state_.Register(Trainer(0), t0_);
  ASSERT_TRUE(t0.ok());
  const uint64_t epoch = state_.epoch();
  ASSERT_TRUE(state_.Register(Trainer(0), t0_ + milliseconds(10)).ok());
  ASSERT_EQ(state_.epoch(), epoch + 1);
  const auto held = [&](const std::string& name, int64_t step, bool serving) {
    control::Heartbeat b = Beat(name, incarnation_[name]);
    b.set_held_epoch(state_.epoch());
    b.set_held_step(step);
    b.set_held_serving(serving);
    ASSERT_TRUE(state_.Heartbeat(b, t0_ + milliseconds(100)).ok());
  };
  held("worker-0", 30, true);
  held("worker-1", 28, true);
  held("worker-2", 30, true);
  control::RoutingTable table = state_.Routing();
  EXPECT_EQ(table.epoch(), epoch + 2);
  EXPECT_FALSE(table.hold());
  EXPECT_FALSE(table.continues());
  EXPECT_EQ(table.resume_step(), 0);  // Nothing committed.
  ASSERT_TRUE(state_.Register(Trainer(0), t0_ + milliseconds(200)).ok());
  ASSERT_EQ(state_.epoch(), epoch + 3);
  held("worker-0", 30, true);
  held("worker-1", 30, false);
  held("worker-2", 30, true);
  table = state_.Routing();
  EXPECT_EQ(table.epoch(), epoch + 4);
  EXPECT_FALSE(table.continues());
}

// A hold that begins in the epoch a hold continued into, before a worker
// adopted that epoch (a worker applies only the newest table it has), gets
// from that worker "not serving" at the step the cluster continued from:
// its shards are as the continue left them, so the cluster continues again
// instead of rolling back (the chaos test found it: a trainer restarted 2
// ms after the hold of its death continued, and 9 steps were redone). A
// worker at another step, or one not serving in a hold that did not begin
// in a continuing epoch, still means a rollback.
TEST_F(ClusterStateTest, AHoldRightAfterAContinueAcceptsWorkersThatSkippedIt) {
  RegisterWorkers(3, t0_);
  ASSERT_TRUE(state_.Register(Trainer(0), t0_).ok());
  const uint64_t epoch = state_.epoch();
  const auto held = [&](const std::string& name, int64_t step, bool serving) {
    control::Heartbeat b = Beat(name, incarnation_[name]);
    b.set_held_epoch(state_.epoch());
    b.set_held_step(step);
    b.set_held_serving(serving);
    ASSERT_TRUE(state_.Heartbeat(b, t0_ + milliseconds(100)).ok());
  };
  ASSERT_TRUE(state_.Register(Trainer(0), t0_ + milliseconds(10)).ok());
  ASSERT_EQ(state_.epoch(), epoch + 1);
  held("worker-0", 9, true);
  held("worker-1", 9, true);
  held("worker-2", 9, true);
  ASSERT_TRUE(state_.Routing().continues());
  ASSERT_EQ(state_.epoch(), epoch + 2);
  // The trainer again, at once: worker-0 never saw epoch + 2.
  ASSERT_TRUE(state_.Register(Trainer(0), t0_ + milliseconds(20)).ok());
  ASSERT_EQ(state_.epoch(), epoch + 3);
  held("worker-0", 9, false);
  held("worker-1", 9, true);
  held("worker-2", 9, true);
  control::RoutingTable table = state_.Routing();
  EXPECT_EQ(table.epoch(), epoch + 4);
  EXPECT_TRUE(table.continues());
  EXPECT_EQ(table.resume_step(), 9);
  // Again: worker-0 skipped epoch + 4 too, and still counts.
  ASSERT_TRUE(state_.Register(Trainer(0), t0_ + milliseconds(30)).ok());
  held("worker-0", 9, false);
  held("worker-1", 9, true);
  held("worker-2", 9, true);
  EXPECT_TRUE(state_.Routing().continues());
  ASSERT_EQ(state_.epoch(), epoch + 6);
  // Not at the step the cluster continued from: a rollback.
  ASSERT_TRUE(state_.Register(Trainer(0), t0_ + milliseconds(40)).ok());
  held("worker-0", 8, false);
  held("worker-1", 9, true);
  held("worker-2", 9, true);
  table = state_.Routing();
  EXPECT_EQ(table.epoch(), epoch + 8);
  EXPECT_FALSE(table.continues());
  EXPECT_EQ(table.resume_step(), 0);  // Nothing committed.
  // A hold after that rollback: not serving is a rollback again.
  ASSERT_TRUE(state_.Register(Trainer(0), t0_ + milliseconds(50)).ok());
  held("worker-0", 0, false);
  held("worker-1", 0, true);
  held("worker-2", 0, true);
  EXPECT_FALSE(state_.Routing().continues());
}

// A trainer that cannot reach a worker says so: that incarnation is
// fenced at once (it may still heartbeat), its shards move and the epoch
// rolls back. A report about an incarnation already gone changes nothing;
// one from a member that is not current is refused.
TEST_F(ClusterStateTest, AWorkerATrainerCannotReachIsFenced) {
  RegisterWorkers(3, t0_);
  auto trainer = state_.Register(Trainer(0), t0_);
  ASSERT_TRUE(trainer.ok());
  const uint64_t epoch = state_.epoch();
  control::PeerLost report;
  report.set_reporter("trainer-0");
  report.set_incarnation(trainer->incarnation());
  report.set_peer("worker-1");
  report.set_peer_incarnation(incarnation_["worker-1"]);
  report.set_error("UNAVAILABLE: data-plane peer lost");
  auto ack = state_.PeerLost(report, t0_ + milliseconds(10));
  ASSERT_TRUE(ack.ok()) << ack.status().ToString();
  EXPECT_TRUE(ack->fenced());
  EXPECT_EQ(Member(state_.Report(t0_), "worker-1").state(), control::DEAD);
  EXPECT_EQ(state_.epoch(), epoch + 1);
  for (const auto& home : Homes(state_.Routing())) {
    EXPECT_NE(home, "worker-1");
  }
  // The table says why its epoch began (members quote it in errors).
  const std::string cause = state_.Routing().cause();
  EXPECT_NE(cause.find("worker-1"), std::string::npos) << cause;
  EXPECT_NE(cause.find("trainer-0"), std::string::npos) << cause;
  ack = state_.PeerLost(report, t0_ + milliseconds(20));
  ASSERT_TRUE(ack.ok());
  EXPECT_FALSE(ack->fenced());
  EXPECT_EQ(state_.epoch(), epoch + 1);
  report.set_incarnation(trainer->incarnation() + 100);
  report.set_peer("worker-2");
  report.set_peer_incarnation(incarnation_["worker-2"]);
  EXPECT_EQ(state_.PeerLost(report, t0_ + milliseconds(30)).status().code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(Member(state_.Report(t0_), "worker-2").state(), control::ALIVE);
}

// A member's control connection closing cuts its lease to two heartbeat
// periods: a killed process is fenced then, not a whole lease later; a
// live one re-registers (or heartbeats) in time and is kept.
TEST_F(ClusterStateTest, ALostConnectionCutsTheLeaseToTwoHeartbeats) {
  RegisterWorkers(3, t0_);
  const uint64_t epoch = state_.epoch();
  state_.ConnectionLost("worker-1", t0_ + milliseconds(10));
  state_.ConnectionLost("worker-2", t0_ + milliseconds(10));
  ASSERT_TRUE(state_
                  .Heartbeat(Beat("worker-2", incarnation_["worker-2"]),
                             t0_ + milliseconds(300))
                  .ok());
  state_.Tick(t0_ + milliseconds(411));  // Heartbeats every 200 ms.
  const auto report = state_.Report(t0_ + milliseconds(411));
  EXPECT_EQ(Member(report, "worker-1").state(), control::DEAD);
  EXPECT_EQ(Member(report, "worker-2").state(), control::ALIVE);
  EXPECT_EQ(Member(report, "worker-0").state(), control::ALIVE);
  EXPECT_EQ(state_.epoch(), epoch + 1);
}

// A worker that keeps dying (crash_loop_deaths within the window) gets no
// shards when it comes back until it has stayed up probation_ms; a worker
// holding nothing that dies moves nothing and leaves the epoch (nothing
// rolls back).
TEST(ClusterStateCrashLoopTest, ACrashLoopingWorkerGetsNoShardsUntilItStaysUp) {
  auto loaded = ParseConfig(
      "", "test",
      {"cluster.workers=3", "cluster.trainers=1", "cluster.lease_ms=1000",
       "cluster.heartbeat_ms=200", "model.num_experts=8",
       "model.dense_shards=2", "cluster.crash_loop_deaths=2",
       "cluster.crash_loop_window_ms=60000", "cluster.probation_ms=5000"});
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  ClusterState state(loaded->config);
  const Clock::time_point t0 = Clock::time_point() + std::chrono::hours(1);
  for (const char* name : {"worker-0", "worker-1", "worker-2"}) {
    ASSERT_TRUE(state.Register(Worker(name), t0).ok());
  }
  ASSERT_GT(Member(state.Report(t0), "worker-2").shards(), 0);
  // Two new processes under its name (each fences the one before): dead
  // twice, a crash loop. Its shards go to the others.
  ASSERT_TRUE(state.Register(Worker("worker-2"), t0 + milliseconds(10)).ok());
  auto third = state.Register(Worker("worker-2"), t0 + milliseconds(20));
  ASSERT_TRUE(third.ok());
  auto report = state.Report(t0 + milliseconds(20));
  EXPECT_EQ(Member(report, "worker-2").shards(), 0);
  EXPECT_GT(Member(report, "worker-2").probation_ms_left(), 0);
  EXPECT_EQ(report.placed_shards(), report.total_shards());
  {
    // A coordinator restarted now still knows the crash loop: the next
    // process under the name is on probation there too.
    auto restored = ClusterState::Restore(loaded->config, state.Snapshot(), t0);
    ASSERT_TRUE(restored.ok()) << restored.status().ToString();
    ASSERT_TRUE(
        restored->Register(Worker("worker-2"), t0 + milliseconds(30)).ok());
    const auto again = restored->Report(t0 + milliseconds(30));
    EXPECT_EQ(Member(again, "worker-2").shards(), 0);
    EXPECT_GT(Member(again, "worker-2").probation_ms_left(), 0);
  }
  // It dies again holding nothing: no shard moves, the epoch stands.
  const uint64_t epoch = state.epoch();
  const auto later = t0 + milliseconds(900);
  for (const char* name : {"worker-0", "worker-1"}) {
    const uint64_t inc = Member(state.Report(later), name).incarnation();
    ASSERT_TRUE(state.Heartbeat(Beat(name, inc), later).ok());
  }
  state.Tick(t0 + milliseconds(1100));
  EXPECT_EQ(Member(state.Report(later), "worker-2").state(), control::DEAD);
  EXPECT_EQ(state.epoch(), epoch);
  // Back once more, and up through its probation: then it gets shards.
  auto back = state.Register(Worker("worker-2"), t0 + milliseconds(1200));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(Member(state.Report(t0 + milliseconds(1200)), "worker-2").shards(),
            0);
  for (int ms = 1200; ms <= 6400; ms += 200) {
    const auto now = t0 + milliseconds(ms);
    for (const char* name : {"worker-0", "worker-1", "worker-2"}) {
      const uint64_t inc = Member(state.Report(now), name).incarnation();
      control::Heartbeat b = Beat(name, inc);
      if (state.Routing().hold()) {
        // Its probation over, its shards move live: a hold (no trainer
        // trains here) the workers report where they stopped in.
        b.set_held_epoch(state.epoch());
        b.set_held_serving(true);
      }
      ASSERT_TRUE(state.Heartbeat(b, now).ok()) << name;
    }
    state.Tick(now);
  }
  report = state.Report(t0 + milliseconds(6400));
  EXPECT_GT(Member(report, "worker-2").shards(), 0);
  EXPECT_EQ(Member(report, "worker-2").probation_ms_left(), 0);
  EXPECT_GT(state.epoch(), epoch);
}

TEST(ClusterStateCrashLoopTest, StoredDeathTimesOfAnyValueRestore) {
  // Found by coordinator_snapshot_fuzzer: a death time far in the past
  // overflowed the clock arithmetic (undefined behaviour). Deaths older than
  // the window, or absurd, are dropped; one in the future counts as now.
  auto loaded = ParseConfig(
      "", "test",
      {"cluster.workers=2", "cluster.trainers=1", "model.num_experts=4",
       "model.dense_shards=1", "cluster.crash_loop_deaths=3",
       "cluster.crash_loop_window_ms=60000", "cluster.probation_ms=5000"});
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  ClusterState state(loaded->config);
  const Clock::time_point t0 = Clock::time_point() + std::chrono::hours(1);
  for (const char* name : {"worker-0", "worker-1"}) {
    ASSERT_TRUE(state.Register(Worker(name), t0).ok());
  }
  control::CoordinatorSnapshot snapshot = state.Snapshot();
  const int64_t now_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::system_clock::now().time_since_epoch())
          .count();
  for (auto& member : *snapshot.mutable_members()) {
    if (member.registration().name() != "worker-1") continue;
    for (int64_t t : {std::numeric_limits<int64_t>::min(), int64_t{0},
                      now_ms - 3600000, std::numeric_limits<int64_t>::max()}) {
      member.add_death_unix_ms(t);
    }
  }
  auto restored = ClusterState::Restore(loaded->config, snapshot, t0);
  ASSERT_TRUE(restored.ok()) << restored.status().ToString();
  // Only the future one counts. A new process under the name fences the
  // old one: two deaths in the window, not the three of a crash loop (all
  // five stored would make one).
  ASSERT_TRUE(restored->Register(Worker("worker-1"), t0).ok());
  EXPECT_EQ(Member(restored->Report(t0), "worker-1").probation_ms_left(), 0);
  const control::CoordinatorSnapshot after = restored->Snapshot();
  for (const auto& member : after.members()) {
    if (member.registration().name() != "worker-1") continue;
    EXPECT_EQ(member.death_unix_ms_size(), 2);
  }
}

TEST_F(ClusterStateTest, RestartResumesPlacementAtTheSameEpoch) {
  RegisterWorkers(3, t0_);
  const auto homes = Homes(state_.Routing());
  const uint64_t epoch = state_.epoch();
  auto restored = ClusterState::Restore(TestConfig(), state_.Snapshot(), t0_);
  ASSERT_TRUE(restored.ok()) << restored.status().ToString();
  EXPECT_EQ(restored->epoch(), epoch);
  EXPECT_EQ(Homes(restored->Routing()), homes);
  EXPECT_EQ(Member(restored->Report(t0_), "worker-0").state(),
            control::UNCONFIRMED);
  // worker-0 and worker-1 reconnect as the same processes: confirmed, no moves.
  for (const char* name : {"worker-0", "worker-1"}) {
    auto r = restored->Register(Worker(name, incarnation_[name]), t0_);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->incarnation(), incarnation_[name]);
  }
  EXPECT_EQ(restored->epoch(), epoch);
  EXPECT_EQ(Homes(restored->Routing()), homes);
  // worker-2 never returns: after the grace of two leases it is dead.
  const auto later = t0_ + milliseconds(2100);
  for (const char* name : {"worker-0", "worker-1"}) {
    ASSERT_TRUE(restored
                    ->Heartbeat(Beat(name, incarnation_[name]),
                                t0_ + milliseconds(1000))
                    .ok());
    ASSERT_TRUE(
        restored->Heartbeat(Beat(name, incarnation_[name]), later).ok());
  }
  restored->Tick(later + milliseconds(1));
  EXPECT_EQ(Member(restored->Report(later), "worker-2").state(), control::DEAD);
  for (const auto& home : Homes(restored->Routing())) {
    EXPECT_TRUE(home == "worker-0" || home == "worker-1") << home;
  }
}

// A member that was told of a commit this state does not have (same run)
// shows the state lost commits: the registration is refused with DATA_LOSS.
// Another run's members (a --fresh start names a new run) are not compared.
TEST_F(ClusterStateTest, AStateOlderThanItsMembersKnowIsFoundOut) {
  auto first = state_.Register(Worker("worker-0"), t0_);
  ASSERT_TRUE(first.ok());
  const std::string run = first->run_id();
  EXPECT_EQ(run.size(), 32u);
  auto restored = ClusterState::Restore(TestConfig(), state_.Snapshot(), t0_);
  ASSERT_TRUE(restored.ok());
  RegisterRequest told = Worker("worker-1");
  told.set_run_id(run);
  told.set_committed_step_seen(500);
  auto refused = restored->Register(told, t0_);
  EXPECT_EQ(refused.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(refused.status().message().find(
                "worker-1 was told of committed checkpoint 500"),
            std::string::npos)
      << refused.status().ToString();
  told.set_committed_step_seen(0);
  EXPECT_TRUE(restored->Register(told, t0_).ok());
  told.set_run_id("another-run");
  told.set_committed_step_seen(500);
  EXPECT_TRUE(restored->Register(told, t0_).ok());
  ASSERT_TRUE(restored->ChooseResumeStep(/*fresh=*/true, 0).ok());
  told.set_run_id(run);
  auto fresh = restored->Register(told, t0_);
  ASSERT_TRUE(fresh.ok()) << fresh.status().ToString();
  EXPECT_NE(fresh->run_id(), run);
}

// Two leases of the largest lease_ms overflow an int32: the grace must
// still be two leases, not negative (members dead at once).
TEST_F(ClusterStateTest, RestoreGraceOfTheLongestLease) {
  RegisterWorkers(3, t0_);
  auto config = TestConfig();
  config.mutable_cluster()->set_lease_ms(2000000000);
  ASSERT_TRUE(ValidateConfig(config, {}).ok());
  auto restored = ClusterState::Restore(config, state_.Snapshot(), t0_);
  ASSERT_TRUE(restored.ok()) << restored.status().ToString();
  restored->Tick(t0_ + std::chrono::hours(24));
  EXPECT_EQ(Member(restored->Report(t0_), "worker-0").state(),
            control::UNCONFIRMED);
}

TEST_F(ClusterStateTest, RestoreRefusesADifferentModel) {
  RegisterWorkers(3, t0_);
  auto other = TestConfig();
  other.mutable_model()->set_num_experts(16);
  auto restored = ClusterState::Restore(other, state_.Snapshot(), t0_);
  EXPECT_EQ(restored.status().code(), StatusCode::kFailedPrecondition);
}

TEST_F(ClusterStateTest, LeaveReplacesAtOnce) {
  RegisterWorkers(3, t0_);
  const uint64_t epoch = state_.epoch();
  control::Leave leave;
  leave.set_name("worker-2");
  leave.set_incarnation(incarnation_["worker-2"]);
  ASSERT_TRUE(state_.Leave(leave).ok());
  EXPECT_EQ(state_.epoch(), epoch + 1);
  EXPECT_EQ(Member(state_.Report(t0_), "worker-2").state(), control::LEFT);
  EXPECT_FALSE(state_.Leave(leave).ok());  // Not current any more.
}

TEST_F(ClusterStateTest, ShortfallIsReported) {
  auto tiny = Worker("worker-0");
  tiny.set_capacity_bytes(1000);
  ASSERT_TRUE(state_.Register(tiny, t0_).ok());
  tiny.set_name("worker-1");
  ASSERT_TRUE(state_.Register(tiny, t0_).ok());
  tiny.set_name("worker-2");
  ASSERT_TRUE(state_.Register(tiny, t0_).ok());
  const auto status = state_.Report(t0_);
  EXPECT_EQ(status.placed_shards(), 0);
  EXPECT_NE(status.placement_error().find("cannot place 18 of 18 shards"),
            std::string::npos)
      << status.placement_error();
  EXPECT_NE(status.placement_error().find("offer 2.93 KiB"), std::string::npos)
      << status.placement_error();
}

TEST_F(ClusterStateTest, RejectsBadRegistrations) {
  struct Case {
    RegisterRequest request;
    StatusCode code;
    const char* fragment;
  };
  RegisterRequest no_name = Worker("");
  RegisterRequest no_capacity = Worker("worker-9");
  no_capacity.set_capacity_bytes(0);
  ASSERT_TRUE(state_.Register(Trainer(0), t0_).ok());
  const std::vector<Case> cases = {
      {no_name, StatusCode::kInvalidArgument, "name must not be empty"},
      {no_capacity, StatusCode::kInvalidArgument, "capacity_bytes 0"},
      {Trainer(2), StatusCode::kInvalidArgument,
       "rank 2 is outside [0, cluster.trainers = 2)"},
      {Trainer(0, "imposter"), StatusCode::kAlreadyExists,
       "rank 0 is already held by live trainer trainer-0"},
      {Worker("trainer-0"), StatusCode::kAlreadyExists, "belongs to a trainer"},
  };
  for (const Case& c : cases) {
    auto r = state_.Register(c.request, t0_);
    ASSERT_FALSE(r.ok()) << c.fragment;
    EXPECT_EQ(r.status().code(), c.code) << c.fragment;
    EXPECT_NE(r.status().message().find(c.fragment), std::string::npos)
        << r.status().message();
  }
}

// A worker's heartbeat carries the training tokens each of its shards
// served since the one before; the status sums them per worker, and the
// next heartbeat's replace them (a shard it no longer reports counts no
// more).
TEST_F(ClusterStateTest, HeartbeatLoadsShowInTheStatus) {
  RegisterWorkers(3, t0_);
  auto load = [](int expert, uint64_t tokens) {
    control::ShardLoad l;
    l.mutable_shard()->set_kind(control::EXPERT);
    l.mutable_shard()->set_expert(expert);
    l.set_tokens(tokens);
    return l;
  };
  control::Heartbeat beat = Beat("worker-0", incarnation_["worker-0"]);
  *beat.add_loads() = load(1, 300);
  *beat.add_loads() = load(2, 20);
  const auto t1 = t0_ + milliseconds(100);
  ASSERT_TRUE(state_.Heartbeat(beat, t1).ok());
  EXPECT_EQ(Member(state_.Report(t1), "worker-0").tokens(), 320u);
  EXPECT_EQ(Member(state_.Report(t1), "worker-1").tokens(), 0u);
  beat.clear_loads();
  *beat.add_loads() = load(1, 5);
  ASSERT_TRUE(state_.Heartbeat(beat, t1 + milliseconds(100)).ok());
  EXPECT_EQ(Member(state_.Report(t1), "worker-0").tokens(), 5u);
}

// With replication, a worker reporting replicated shards hears the
// workers to put their copies on: the serving ones by their own shards'
// tokens, least first; its copy statistics show in the status.
TEST(ClusterStateReplicationTest, CopyHostsRankWorkersByTheirOwnTokens) {
  config::SwitchyardConfig config = TestConfig();
  config.mutable_replication()->set_enabled(true);
  ClusterState state(config);
  const Clock::time_point t0 = Clock::time_point() + std::chrono::hours(1);
  std::map<std::string, uint64_t> inc;
  for (int i = 0; i < 3; ++i) {
    const std::string name = "worker-" + std::to_string(i);
    inc[name] = state.Register(Worker(name), t0).value().incarnation();
  }
  auto beat = [&](const std::string& name, uint64_t tokens, int replicas,
                  Clock::time_point now) {
    control::Heartbeat b = Beat(name, inc[name]);
    control::ShardLoad* l = b.add_loads();
    l->mutable_shard()->set_kind(control::EXPERT);
    l->mutable_shard()->set_expert(static_cast<int>(name.back() - '0'));
    l->set_tokens(tokens);
    l->set_replicas(replicas);
    b.set_copy_tokens(tokens / 10);
    b.set_offloaded_tokens(replicas > 1 ? tokens / 2 : 0);
    b.set_copy_bytes(1000);
    auto ack = state.Heartbeat(b, now);
    EXPECT_TRUE(ack.ok()) << ack.status().ToString();
    return std::vector<std::string>(ack->copy_hosts().begin(),
                                    ack->copy_hosts().end());
  };
  using Names = std::vector<std::string>;
  // worker-1 and -2 report first (without replicated shards: no ranking).
  EXPECT_EQ(beat("worker-1", 500, 1, t0), Names{});
  EXPECT_EQ(beat("worker-2", 100, 1, t0), Names{});
  EXPECT_EQ(beat("worker-0", 4000, 4, t0),
            (Names{"worker-2", "worker-1", "worker-0"}));
  const auto status = state.Report(t0);
  const auto& hot = Member(status, "worker-0");
  ASSERT_EQ(hot.replicated_size(), 1);
  EXPECT_EQ(hot.replicated(0).replicas(), 4);
  EXPECT_EQ(hot.replicated(0).tokens(), 4000u);
  EXPECT_EQ(hot.offloaded_tokens(), 2000u);
  EXPECT_EQ(Member(status, "worker-1").copy_tokens(), 50u);
  EXPECT_EQ(Member(status, "worker-2").copy_bytes(), 1000);
  EXPECT_EQ(Member(status, "worker-2").replicated_size(), 0);
  // `switchyard status` shows them: the load per worker counts the rows
  // each computed (2400 = 4000 - 2000 offloaded + 400 as copies; 550;
  // 110).
  const std::string text = cli::FormatStatus(status);
  for (const char* want :
       {"hot expert shard L0.E0.S0 on worker-0: 4 replicas (4000 tokens)",
        "worker-1 computed 50 rows for other workers' shards and had 0 of its "
        "own computed elsewhere",
        "worker-0 computed 400 rows for other workers' shards and had 2000",
        "with the rows copies computed): max/mean 2.35"}) {
    EXPECT_NE(text.find(want), std::string::npos) << want << "\n" << text;
  }
  // Loads change: the ranking follows once a heartbeat period has passed.
  EXPECT_EQ(beat("worker-2", 900, 1, t0 + milliseconds(10)), Names{});
  EXPECT_EQ(beat("worker-0", 4000, 4, t0 + milliseconds(20)),
            (Names{"worker-2", "worker-1", "worker-0"}));
  EXPECT_EQ(beat("worker-0", 4000, 4, t0 + milliseconds(250)),
            (Names{"worker-1", "worker-2", "worker-0"}));
  // A draining worker takes no copies, from the drain on (not a
  // heartbeat period later).
  control::DrainRequest drain;
  drain.set_worker("worker-1");
  auto drained = state.Drain(drain, t0 + milliseconds(260));
  ASSERT_TRUE(drained.ok()) << drained.status().ToString();
  EXPECT_EQ(beat("worker-0", 4000, 4, t0 + milliseconds(270)),
            (Names{"worker-2", "worker-0"}));
  // Cooled: no ranking, and nothing replicated in the status.
  EXPECT_EQ(beat("worker-0", 300, 1, t0 + milliseconds(800)), Names{});
  EXPECT_EQ(Member(state.Report(t0), "worker-0").replicated_size(), 0);
}

}  // namespace
}  // namespace switchyard::coordinator
