// Live moves in the coordinator's state machine (a join, a drain, a
// probation's end): the trainers pause at a step boundary, the cluster
// holds there, and the next epoch continues from that step with the moved
// shards naming their old homes; nothing rolls back. Driven with chosen
// times, as cluster_state_test.cc.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "common/config.h"
#include "common/model_shape.h"
#include "coordinator/cluster_state.h"

namespace switchyard::coordinator {
namespace {

using std::chrono::milliseconds;

config::SwitchyardConfig MoveConfig() {
  std::vector<std::string> sets = {
      "cluster.workers=3",           "cluster.trainers=2",
      "cluster.lease_ms=1000",       "cluster.heartbeat_ms=200",
      "model.num_experts=8",         "model.dense_shards=2",
      "cluster.move_timeout_ms=5000"};
  auto loaded = ParseConfig("", "test", sets);
  CHECK(loaded.ok()) << loaded.status().ToString();
  return loaded->config;
}

class LiveMoveTest : public ::testing::Test {
 protected:
  const Clock::time_point t0_ = Clock::time_point() + std::chrono::hours(1);
  ClusterState state_{MoveConfig()};
  std::map<std::string, uint64_t> incarnation_;

  void Register(const std::string& name, bool worker,
                int64_t capacity = int64_t{1} << 30) {
    control::RegisterRequest r;
    r.set_name(name);
    r.set_kind(worker ? control::WORKER : control::TRAINER);
    if (worker) {
      r.set_capacity_bytes(capacity);
      r.set_rank(-1);
    } else {
      r.set_rank(name.back() - '0');
    }
    auto response = state_.Register(r, t0_);
    ASSERT_TRUE(response.ok()) << response.status().ToString();
    incarnation_[name] = response->incarnation();
  }
  // Three workers placed and two trainers training under the epoch.
  void StartTraining(int64_t capacity = int64_t{1} << 30) {
    for (int i = 0; i < 3; ++i) {
      Register("worker-" + std::to_string(i), true, capacity);
    }
    Register("trainer-0", false);
    Register("trainer-1", false);
    Train("trainer-0", 40);
    Train("trainer-1", 40);
  }
  StatusOr<control::HeartbeatAck> Beat(const control::Heartbeat& beat) {
    return state_.Heartbeat(beat, t0_ + milliseconds(100));
  }
  control::Heartbeat BeatOf(const std::string& name) {
    control::Heartbeat b;
    b.set_name(name);
    b.set_incarnation(incarnation_.at(name));
    return b;
  }
  void Train(const std::string& trainer, int64_t step) {
    control::Heartbeat b = BeatOf(trainer);
    b.set_training_epoch(state_.epoch());
    b.set_step(step);
    ASSERT_TRUE(Beat(b).ok());
  }
  void Pause(const std::string& trainer, int64_t before_step) {
    control::Heartbeat b = BeatOf(trainer);
    b.set_training_epoch(state_.epoch());
    b.set_step(before_step - 1);
    b.set_paused(true);
    b.set_paused_step(before_step);
    ASSERT_TRUE(Beat(b).ok());
  }
  // worker-1, the only holder of every shard of checkpoint `steps`, is
  // drained: the trainers pause at step 61 and the cluster continues from
  // there. Returns worker-1's checkpoint report.
  control::CheckpointReport DrainTheOnlyHolder(std::vector<int64_t> steps) {
    control::CheckpointReport commit;
    commit.set_name("worker-1");
    commit.set_incarnation(incarnation_["worker-1"]);
    const control::RoutingTable placed = state_.Routing();
    for (int i = 0; i < placed.entries_size(); ++i) {
      auto* s = commit.add_shards();
      *s->mutable_shard() = placed.entries(i).shard();
      s->set_digest("d" + std::to_string(i));
      s->set_bytes(10);
    }
    for (int64_t step : steps) {
      commit.set_step(step);
      EXPECT_TRUE(state_.ReportCheckpoint(commit).ok());
    }
    EXPECT_EQ(state_.Report(t0_).checkpoints_size(),
              static_cast<int>(steps.size()));
    control::DrainRequest drain;
    drain.set_worker("worker-1");
    EXPECT_TRUE(state_.Drain(drain, t0_).ok());
    Pause("trainer-0", 61);
    Pause("trainer-1", 61);
    Held(61);
    EXPECT_TRUE(state_.Routing().continues());
    return commit;
  }
  // Every worker reports where the hold stopped it.
  void Held(int64_t step) {
    const uint64_t epoch = state_.epoch();
    for (const auto& [name, inc] : incarnation_) {
      if (name.rfind("worker-", 0) != 0) continue;
      control::Heartbeat b = BeatOf(name);
      b.set_held_epoch(epoch);
      b.set_held_step(step);
      b.set_held_serving(true);
      ASSERT_TRUE(Beat(b).ok());
    }
  }
  // Every worker serves the current epoch; `name`'s acknowledgement.
  control::HeartbeatAck Open(const std::string& name) {
    control::HeartbeatAck mine;
    for (const auto& [w, inc] : incarnation_) {
      if (w.rfind("worker-", 0) != 0) continue;
      control::Heartbeat b = BeatOf(w);
      b.set_open_epoch(state_.epoch());
      auto ack = Beat(b);
      EXPECT_TRUE(ack.ok()) << ack.status().ToString();
      if (w == name && ack.ok()) mine = *ack;
    }
    // Acks after everyone reported.
    auto ack = Beat(BeatOf(name));
    EXPECT_TRUE(ack.ok());
    return ack.ok() ? *ack : mine;
  }
  int Shards(const std::string& name) {
    const control::StatusResponse report = state_.Report(t0_);
    for (const auto& m : report.members()) {
      if (m.name() == name) return m.shards();
    }
    return -1;
  }
};

TEST_F(LiveMoveTest, AJoinPausesAtAStepBoundaryThenMovesShardsLive) {
  StartTraining();
  const uint64_t epoch = state_.epoch();
  const control::RoutingTable before = state_.Routing();
  Register("worker-3", true);
  // The epoch stands; the table asks the trainers to pause.
  EXPECT_EQ(state_.epoch(), epoch);
  EXPECT_TRUE(state_.Routing().pause());
  EXPECT_EQ(state_.Routing().pause_step(), 0);
  // The pause table names the planned new homes, so that they make the
  // shards' memory ready while the trainers finish their step.
  const control::RoutingTable pausing = state_.Routing();
  EXPECT_NE(state_.Report(t0_).pending_move().find("worker-3 joined"),
            std::string::npos);
  EXPECT_EQ(Shards("worker-3"), 0);
  // trainer-1 had begun step 51 when it heard: the pause moves on to the
  // boundary before 52, and trainer-0 runs on to it.
  Pause("trainer-0", 51);
  EXPECT_EQ(state_.epoch(), epoch);
  Pause("trainer-1", 52);
  EXPECT_EQ(state_.epoch(), epoch);
  EXPECT_EQ(state_.Routing().pause_step(), 52);
  Pause("trainer-0", 52);
  // Both at one boundary: the cluster holds there.
  EXPECT_EQ(state_.epoch(), epoch + 1);
  EXPECT_TRUE(state_.Routing().hold());
  EXPECT_FALSE(state_.Routing().pause());
  const control::RoutingTable holding = state_.Routing();
  for (const auto& e : holding.entries()) {
    EXPECT_EQ(e.moving_to(), "");  // Only while pausing.
  }
  Held(52);
  const control::RoutingTable after = state_.Routing();
  EXPECT_EQ(after.epoch(), epoch + 2);
  EXPECT_TRUE(after.continues());
  EXPECT_EQ(after.resume_step(), 52);
  int moved = 0;
  for (int i = 0; i < after.entries_size(); ++i) {
    const auto& e = after.entries(i);
    const std::string home = after.workers(e.worker()).name();
    const std::string old = before.workers(before.entries(i).worker()).name();
    if (home == old) {
      EXPECT_EQ(e.moved_from(), "") << i;
      EXPECT_EQ(pausing.entries(i).moving_to(), "") << i;
    } else {
      // Only onto the newcomer, from where the shard was, as planned.
      EXPECT_EQ(home, "worker-3") << i;
      EXPECT_EQ(e.moved_from(), old) << i;
      EXPECT_EQ(pausing.entries(i).moving_to(), "worker-3") << i;
      ++moved;
    }
  }
  EXPECT_GT(moved, 0);
  EXPECT_EQ(Shards("worker-3"), moved);
  const auto report = state_.Report(t0_);
  EXPECT_EQ(report.pending_move(), "");
  ASSERT_GT(report.recoveries_size(), 0);
  EXPECT_FALSE(report.recoveries().rbegin()->rolled_back());
  // Once every holder serves the epoch, what was handed over may go.
  EXPECT_EQ(Beat(BeatOf("worker-0"))->moves_done_epoch(), 0u);
  EXPECT_EQ(Open("worker-0").moves_done_epoch(), epoch + 2);
}

TEST_F(LiveMoveTest, ADrainMovesEveryShardOffThenTheWorkerIsToldItIsDrained) {
  StartTraining();
  const uint64_t epoch = state_.epoch();
  control::DrainRequest drain;
  drain.set_worker("worker-1");
  auto response = state_.Drain(drain, t0_);
  ASSERT_TRUE(response.ok()) << response.status().ToString();
  EXPECT_GT(response->shards(), 0);
  EXPECT_TRUE(state_.Routing().pause());
  const control::StatusResponse report = state_.Report(t0_);
  for (const auto& m : report.members()) {
    EXPECT_EQ(m.draining(), m.name() == "worker-1") << m.name();
  }
  // Asking again changes nothing.
  ASSERT_TRUE(state_.Drain(drain, t0_).ok());
  EXPECT_FALSE(Beat(BeatOf("worker-1"))->drained());
  Pause("trainer-0", 61);
  Pause("trainer-1", 61);
  Held(61);
  EXPECT_EQ(state_.epoch(), epoch + 2);
  EXPECT_TRUE(state_.Routing().continues());
  EXPECT_EQ(Shards("worker-1"), 0);
  const control::RoutingTable table = state_.Routing();
  for (const auto& e : table.entries()) {
    EXPECT_NE(table.workers(e.worker()).name(), "worker-1");
  }
  // Drained once the new homes serve what it handed over.
  EXPECT_FALSE(Beat(BeatOf("worker-1"))->drained());
  EXPECT_TRUE(Open("worker-1").drained());
  EXPECT_FALSE(Open("worker-0").drained());
  // Then it leaves: nothing moves, the epoch stands.
  control::Leave leave;
  leave.set_name("worker-1");
  leave.set_incarnation(incarnation_["worker-1"]);
  ASSERT_TRUE(state_.Leave(leave).ok());
  EXPECT_EQ(state_.epoch(), epoch + 2);
}

TEST_F(LiveMoveTest, ADrainTheOthersCannotHoldIsRefusedAndChangesNothing) {
  // Each worker holds 40% of the model: three hold it, two cannot.
  int64_t total = 0;
  for (const auto& s : ModelShards(MoveConfig())) total += s.bytes;
  StartTraining(/*capacity=*/total * 4 / 10);
  ASSERT_EQ(state_.Report(t0_).placed_shards(),
            state_.Report(t0_).total_shards());
  const uint64_t epoch = state_.epoch();
  control::DrainRequest drain;
  drain.set_worker("worker-2");
  auto refused = state_.Drain(drain, t0_);
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("cannot drain worker-2"),
            std::string::npos)
      << refused.status().message();
  EXPECT_NE(refused.status().message().find("keeps serving"),
            std::string::npos);
  EXPECT_EQ(state_.epoch(), epoch);
  EXPECT_FALSE(state_.Routing().pause());
  EXPECT_GT(Shards("worker-2"), 0);
  const control::StatusResponse report = state_.Report(t0_);
  for (const auto& m : report.members()) EXPECT_FALSE(m.draining());
}

TEST_F(LiveMoveTest, UnknownAndDeadWorkersCannotBeDrained) {
  StartTraining();
  control::DrainRequest drain;
  drain.set_worker("worker-9");
  EXPECT_EQ(state_.Drain(drain, t0_).status().code(), StatusCode::kNotFound);
  drain.set_worker("trainer-0");
  EXPECT_EQ(state_.Drain(drain, t0_).status().code(), StatusCode::kNotFound);
  // Cancelling a drain that was never asked for says so.
  drain.set_worker("worker-0");
  drain.set_cancel(true);
  auto cancelled = state_.Drain(drain, t0_);
  ASSERT_TRUE(cancelled.ok());
  EXPECT_NE(cancelled->message().find("was not draining"), std::string::npos);
  EXPECT_FALSE(state_.Routing().pause());
}

TEST_F(LiveMoveTest, APauseTheTrainersDoNotFinishBecomesARollback) {
  StartTraining();
  const uint64_t epoch = state_.epoch();
  Register("worker-3", true);
  // The members stay alive past the move timeout (5 s); trainer-0 stops
  // at a boundary, trainer-1 never gets to one.
  for (int ms = 200; ms <= 5200; ms += 200) {
    const auto now = t0_ + milliseconds(ms);
    for (const auto& [name, inc] : incarnation_) {
      control::Heartbeat b = BeatOf(name);
      if (name.rfind("trainer-", 0) == 0) b.set_training_epoch(epoch);
      if (name == "trainer-0") {
        b.set_paused(true);
        b.set_paused_step(51);
      }
      ASSERT_TRUE(state_.Heartbeat(b, now).ok());
    }
    state_.Tick(now);
    if (ms == 4800) {
      EXPECT_TRUE(state_.Routing().pause());
      EXPECT_EQ(state_.epoch(), epoch);
    }
  }
  const control::RoutingTable table = state_.Routing();
  EXPECT_FALSE(table.pause());
  EXPECT_EQ(table.epoch(), epoch + 1);
  EXPECT_FALSE(table.hold());
  EXPECT_FALSE(table.continues());  // A rollback.
  EXPECT_GT(Shards("worker-3"), 0);
  const auto report = state_.Report(t0_);
  EXPECT_TRUE(report.recoveries().rbegin()->rolled_back());
  EXPECT_NE(report.recoveries().rbegin()->cause().find("move_timeout_ms"),
            std::string::npos);
}

TEST_F(LiveMoveTest, AWorkerDeathDuringAPauseIsRecoveredAsAFailure) {
  StartTraining();
  const uint64_t epoch = state_.epoch();
  Register("worker-3", true);
  ASSERT_TRUE(state_.Routing().pause());
  control::PeerLost lost;
  lost.set_reporter("trainer-0");
  lost.set_incarnation(incarnation_["trainer-0"]);
  lost.set_peer("worker-0");
  lost.set_peer_incarnation(incarnation_["worker-0"]);
  ASSERT_TRUE(state_.PeerLost(lost, t0_).ok());
  const control::RoutingTable table = state_.Routing();
  EXPECT_EQ(table.epoch(), epoch + 1);
  EXPECT_FALSE(table.pause());
  EXPECT_FALSE(table.continues());
  for (const auto& e : table.entries()) {
    EXPECT_NE(table.workers(e.worker()).name(), "worker-0");
    EXPECT_EQ(e.moved_from(), "");
  }
}

TEST_F(LiveMoveTest, WithNoTrainerTrainingTheClusterHoldsAtOnce) {
  for (int i = 0; i < 3; ++i) Register("worker-" + std::to_string(i), true);
  const uint64_t epoch = state_.epoch();
  Register("worker-3", true);
  EXPECT_EQ(state_.epoch(), epoch + 1);
  EXPECT_TRUE(state_.Routing().hold());
  Held(0);
  EXPECT_TRUE(state_.Routing().continues());
  EXPECT_GT(Shards("worker-3"), 0);
}

// A rollback that comes during a move's hold (a worker re-registers, as a
// restarted cluster's do) makes the move: the joiner gets its shards with
// it rather than a lease later.
TEST_F(LiveMoveTest, ARollbackDuringAMovesHoldMakesTheMove) {
  for (int i = 0; i < 3; ++i) Register("worker-" + std::to_string(i), true);
  const uint64_t epoch = state_.epoch();
  Register("worker-3", true);
  ASSERT_TRUE(state_.Routing().hold());
  const int held_by_1 = Shards("worker-1");
  Register("worker-1", true);  // A new incarnation: a rollback.
  const control::RoutingTable table = state_.Routing();
  EXPECT_EQ(table.epoch(), epoch + 2);
  EXPECT_FALSE(table.hold());
  EXPECT_FALSE(table.continues());
  EXPECT_GT(Shards("worker-3"), 0);
  // Placed with the new incarnation counted: only onto the joiner, and the
  // restarted worker is no joiner to move shards back to.
  EXPECT_LE(Shards("worker-1"), held_by_1);
  EXPECT_GT(Shards("worker-1"), 0);
  EXPECT_EQ(state_.Report(t0_).pending_move(), "");
}

// A move's hold that cannot continue (a worker was not serving) ends in a
// rollback, and the moves are made with it: the joiner gets its shards,
// restored from the newest committed checkpoint.
TEST_F(LiveMoveTest, AMoveWhoseHoldCannotContinueIsMadeWithTheRollback) {
  StartTraining();
  const uint64_t epoch = state_.epoch();
  Register("worker-3", true);
  Pause("trainer-0", 51);
  Pause("trainer-1", 51);
  ASSERT_TRUE(state_.Routing().hold());
  for (const char* name : {"worker-0", "worker-1", "worker-2", "worker-3"}) {
    control::Heartbeat b = BeatOf(name);
    b.set_held_epoch(epoch + 1);
    b.set_held_step(51);
    b.set_held_serving(std::string(name) != "worker-1");
    ASSERT_TRUE(Beat(b).ok());
  }
  const control::RoutingTable table = state_.Routing();
  EXPECT_EQ(table.epoch(), epoch + 2);
  EXPECT_FALSE(table.continues());
  EXPECT_FALSE(table.hold());
  EXPECT_GT(Shards("worker-3"), 0);
  for (const auto& e : table.entries()) EXPECT_EQ(e.moved_from(), "");
}

// A drained worker may leave only once nothing kept needs its store: the
// shards it held of every kept committed checkpoint (the newest for a
// rollback, the older for --from-step and exports) are copied onto their
// new homes (replication tasks in their heartbeat acks) first.
TEST_F(LiveMoveTest, ADrainedWorkerWaitsUntilItsCommittedCopiesAreElsewhere) {
  StartTraining();
  // Checkpoints 40 and 50 committed (keep_last 2), worker-1 the only holder
  // of every shard.
  const control::CheckpointReport commit = DrainTheOnlyHolder({40, 50});
  EXPECT_FALSE(Open("worker-1").drained());
  state_.Tick(t0_ + milliseconds(150));
  // The new homes are told to copy both checkpoints' shards from
  // worker-1; each reports its copies as replicas, checkpoint 50's first.
  std::map<int64_t,
           std::vector<std::pair<std::string, control::ReplicationTask>>>
      tasks;
  for (const char* home : {"worker-0", "worker-2"}) {
    auto ack = Beat(BeatOf(home));
    ASSERT_TRUE(ack.ok());
    for (const auto& task : ack->replicate()) {
      EXPECT_EQ(task.source(), "worker-1");
      tasks[task.step()].push_back({home, task});
    }
  }
  ASSERT_EQ(tasks.size(), 2u);
  for (int64_t step : {50, 40}) {
    EXPECT_FALSE(Open("worker-1").drained()) << step;
    for (const auto& [home, task] : tasks[step]) {
      control::CheckpointReport copy;
      copy.set_name(home);
      copy.set_incarnation(incarnation_[home]);
      copy.set_step(step);
      copy.set_replica(true);
      for (const auto& ref : task.shards()) {
        for (const auto& s : commit.shards()) {
          if (s.shard().SerializeAsString() == ref.SerializeAsString()) {
            *copy.add_shards() = s;
          }
        }
      }
      ASSERT_TRUE(state_.ReportCheckpoint(copy).ok());
    }
  }
  EXPECT_TRUE(Open("worker-1").drained());
}

// A copy off a draining worker that is not reported (it failed, or its
// target went away) is queued again after cluster.move_timeout_ms, so the
// drain does not wait forever on it.
TEST_F(LiveMoveTest, ACopyOffADrainNotReportedIsQueuedAgain) {
  StartTraining();
  DrainTheOnlyHolder({50});
  // Every member keeps beating every 200 ms; nobody reports a copy. The
  // tasks go out once, then again once move_timeout_ms (5 s) has passed.
  std::vector<int> tasks_at_ms;
  for (int ms = 200; ms <= 6000; ms += 200) {
    const auto now = t0_ + milliseconds(ms);
    state_.Tick(now);
    for (const auto& [name, inc] : incarnation_) {
      control::Heartbeat b = BeatOf(name);
      if (name.rfind("trainer-", 0) == 0) {
        b.set_training_epoch(state_.epoch());
        b.set_step(61);
      } else {
        b.set_open_epoch(state_.epoch());
      }
      auto ack = state_.Heartbeat(b, now);
      ASSERT_TRUE(ack.ok())
          << name << " at " << ms << ": " << ack.status().ToString();
      for (const auto& task : ack->replicate()) {
        EXPECT_EQ(task.step(), 50);
        if (tasks_at_ms.empty() || tasks_at_ms.back() != ms) {
          tasks_at_ms.push_back(ms);
        }
      }
      EXPECT_FALSE(ack->drained()) << name;
    }
  }
  ASSERT_EQ(tasks_at_ms.size(), 2u);
  EXPECT_GE(tasks_at_ms[1] - tasks_at_ms[0], 5000);
}

// A new process under a drained (or draining) worker's name serves again:
// the drain ended with the old one.
TEST_F(LiveMoveTest, ANewProcessUnderADrainedNameIsNotDraining) {
  StartTraining();
  control::DrainRequest drain;
  drain.set_worker("worker-2");
  ASSERT_TRUE(state_.Drain(drain, t0_).ok());
  Register("worker-2", true);  // Restarted (e.g. a StatefulSet scaled up).
  const control::StatusResponse report = state_.Report(t0_);
  for (const auto& m : report.members()) EXPECT_FALSE(m.draining()) << m.name();
  EXPECT_FALSE(Beat(BeatOf("worker-2"))->drained());
}

// A trainer that began step 52 before it heard of the pause (its
// heartbeat says so) stops before 53: the one stopped before 51 goes on.
TEST_F(LiveMoveTest, TrainersTwoBoundariesApartMeetAtTheFurthest) {
  StartTraining();
  Register("worker-3", true);
  Train("trainer-1", 52);
  Pause("trainer-0", 51);
  EXPECT_EQ(state_.Routing().pause_step(), 53);
  EXPECT_FALSE(state_.Routing().hold());
  Pause("trainer-1", 53);
  Pause("trainer-0", 53);
  EXPECT_TRUE(state_.Routing().hold());
}

// After a coordinator restart the trainers have not said where they are:
// a join then waits for them instead of holding a cluster mid-step.
TEST_F(LiveMoveTest, AfterARestartAMoveWaitsForTheTrainersToReport) {
  StartTraining();
  auto restored = ClusterState::Restore(MoveConfig(), state_.Snapshot(), t0_);
  ASSERT_TRUE(restored.ok()) << restored.status().ToString();
  const uint64_t epoch = restored->epoch();
  control::RegisterRequest joiner;
  joiner.set_name("worker-3");
  joiner.set_kind(control::WORKER);
  joiner.set_capacity_bytes(int64_t{1} << 30);
  joiner.set_rank(-1);
  ASSERT_TRUE(restored->Register(joiner, t0_ + milliseconds(10)).ok());
  EXPECT_TRUE(restored->Routing().pause());
  EXPECT_EQ(restored->epoch(), epoch) << "no hold before the trainers report";
}

}  // namespace
}  // namespace switchyard::coordinator
