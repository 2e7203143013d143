// The checkpoint ledger alone: when a checkpoint commits (replicas only
// when their digests are the holder's), what it refuses or ignores, which
// checkpoints it keeps, where training resumes, and what a restart keeps.
#include "coordinator/checkpoint_ledger.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/config.h"
#include "common/model_shape.h"
#include "common/shard_ref.h"

namespace switchyard::coordinator {
namespace {

// 2 MoE layers x 8 experts, and 2 dense shards: 18 shards.
std::vector<ShardId> TestShards() {
  auto loaded =
      ParseConfig("", "test", {"model.num_experts=8", "model.dense_shards=2"});
  CHECK(loaded.ok()) << loaded.status().ToString();
  std::vector<ShardId> ids;
  for (const auto& s : ModelShards(loaded->config)) ids.push_back(s.id);
  return ids;
}

class CheckpointLedgerTest : public ::testing::Test {
 protected:
  const std::vector<ShardId> shards_ = TestShards();

  std::vector<int> AllShards() const {
    std::vector<int> all;
    for (size_t i = 0; i < shards_.size(); ++i) all.push_back(i);
    return all;
  }
  std::vector<int> ShardsOfKind(ShardId::Kind kind) const {
    std::vector<int> of_kind;
    for (size_t i = 0; i < shards_.size(); ++i) {
      if (shards_[i].kind == kind) of_kind.push_back(i);
    }
    return of_kind;
  }
  // `name`'s report of shards `indices` at `step`; shard i's digest is
  // "d<i>@<step>" and its size 10 + i bytes.
  control::CheckpointReport Report(const std::string& name, int64_t step,
                                   const std::vector<int>& indices,
                                   bool replica = false) const {
    control::CheckpointReport r;
    r.set_name(name);
    r.set_step(step);
    r.set_replica(replica);
    for (int i : indices) {
      auto* s = r.add_shards();
      *s->mutable_shard() = ToShardRef(shards_[i]);
      s->set_digest("d" + std::to_string(i) + "@" + std::to_string(step));
      s->set_bytes(10 + i);
    }
    return r;
  }
  // Records `report`, which must be accepted; returns the step it committed.
  int64_t Record(CheckpointLedger* ledger,
                 const control::CheckpointReport& report,
                 size_t replicas_wanted = 0) {
    auto outcome = ledger->Record(report, replicas_wanted);
    EXPECT_TRUE(outcome.ok()) << outcome.status().ToString();
    if (!outcome.ok()) return -1;
    EXPECT_TRUE(outcome->recorded);
    return outcome->committed_step;
  }
  // Commits `step` with every shard on `holder`.
  void CommitWhole(CheckpointLedger* ledger, int64_t step,
                   const std::string& holder = "worker-0") {
    ASSERT_EQ(Record(ledger, Report(holder, step, AllShards())), step);
  }
  static std::vector<int64_t> Steps(const CheckpointLedger& ledger) {
    std::vector<int64_t> steps;
    for (const auto& c : ledger.committed()) steps.push_back(c.step());
    return steps;
  }
};

TEST_F(CheckpointLedgerTest, TheModelHasExpertAndDenseShards) {
  ASSERT_EQ(shards_.size(), 18u);
  EXPECT_EQ(ShardsOfKind(ShardId::Kind::kExpert).size(), 16u);
  EXPECT_EQ(ShardsOfKind(ShardId::Kind::kDense).size(), 2u);
}

TEST_F(CheckpointLedgerTest, CommitsOnlyOnceEveryShardHasReported) {
  // Whichever shard is missing, expert or dense, nothing commits until it
  // reports.
  for (size_t missing = 0; missing < shards_.size(); ++missing) {
    SCOPED_TRACE("missing shard " + shards_[missing].ToString());
    CheckpointLedger ledger(shards_, /*keep_last=*/2);
    std::vector<int> others;
    for (size_t i = 0; i < shards_.size(); ++i) {
      if (i != missing) others.push_back(i);
    }
    const uint64_t version = ledger.version();
    EXPECT_EQ(Record(&ledger, Report("worker-0", 5, others)), 0);
    EXPECT_TRUE(ledger.committed().empty());
    EXPECT_EQ(ledger.latest_committed_step(), 0);
    EXPECT_EQ(ledger.version(), version);  // Nothing to persist yet.
    EXPECT_EQ(
        Record(&ledger, Report("worker-1", 5, {static_cast<int>(missing)})), 5);
    EXPECT_EQ(Steps(ledger), std::vector<int64_t>{5});
    EXPECT_GT(ledger.version(), version);
  }
}

TEST_F(CheckpointLedgerTest, ExpertsAloneDoNotCommitWithoutTheDenseTables) {
  CheckpointLedger ledger(shards_, /*keep_last=*/2);
  EXPECT_EQ(Record(&ledger,
                   Report("worker-0", 3, ShardsOfKind(ShardId::Kind::kExpert))),
            0);
  EXPECT_TRUE(ledger.committed().empty());
  EXPECT_EQ(Record(&ledger,
                   Report("worker-1", 3, ShardsOfKind(ShardId::Kind::kDense))),
            3);
  // The commit lists each shard's holder and digest in the model's order.
  ASSERT_EQ(ledger.committed().size(), 1u);
  const control::CommittedCheckpoint& c = ledger.committed()[0];
  EXPECT_EQ(c.step(), 3);
  EXPECT_EQ(c.shards(), 18);
  ASSERT_EQ(c.holder_size(), 18);
  ASSERT_EQ(c.digest_size(), 18);
  uint64_t bytes = 0;
  for (int i = 0; i < 18; ++i) {
    EXPECT_EQ(c.holder(i), shards_[i].is_expert() ? "worker-0" : "worker-1");
    EXPECT_EQ(c.digest(i), "d" + std::to_string(i) + "@3");
    EXPECT_EQ(c.replicas(i), "");
    bytes += 10 + i;
  }
  EXPECT_EQ(c.bytes(), bytes);
  EXPECT_GT(c.committed_unix_ms(), 0);
}

TEST_F(CheckpointLedgerTest, ReplicasAreRequiredWhenWanted) {
  CheckpointLedger ledger(shards_, /*keep_last=*/2);
  std::vector<int> all_but_last = AllShards();
  all_but_last.pop_back();
  const int last = static_cast<int>(shards_.size()) - 1;
  // Two replicas wanted: the holder's report and one replica's are not
  // enough, nor is that replica reporting again.
  EXPECT_EQ(Record(&ledger, Report("worker-0", 4, AllShards()), 2), 0);
  EXPECT_EQ(Record(&ledger, Report("worker-1", 4, AllShards(), true), 2), 0);
  EXPECT_EQ(Record(&ledger, Report("worker-1", 4, AllShards(), true), 2), 0);
  EXPECT_EQ(Record(&ledger, Report("worker-2", 4, all_but_last, true), 2), 0);
  EXPECT_TRUE(ledger.committed().empty());
  EXPECT_EQ(Record(&ledger, Report("worker-2", 4, {last}, true), 2), 4);
  ASSERT_EQ(ledger.committed().size(), 1u);
  const control::CommittedCheckpoint& c = ledger.committed()[0];
  ASSERT_EQ(c.replicas_size(), 18);
  for (int i = 0; i < 18; ++i) {
    EXPECT_EQ(c.holder(i), "worker-0");
    EXPECT_EQ(c.replicas(i), "worker-1,worker-2");
  }
}

TEST_F(CheckpointLedgerTest, ReplicasWithoutTheHolderDoNotCommit) {
  CheckpointLedger ledger(shards_, /*keep_last=*/2);
  std::vector<int> all_but_first = AllShards();
  all_but_first.erase(all_but_first.begin());
  EXPECT_EQ(Record(&ledger, Report("worker-1", 6, AllShards(), true), 1), 0);
  EXPECT_EQ(Record(&ledger, Report("worker-0", 6, all_but_first), 1), 0);
  EXPECT_TRUE(ledger.committed().empty());
  EXPECT_EQ(Record(&ledger, Report("worker-0", 6, {0}), 1), 6);
}

// A replica whose copy's digest is not its holder's is refused whole
// (DATA_LOSS) and does not count; a replica reported before its holder
// counts only if the digests agree.
TEST_F(CheckpointLedgerTest, ReplicasMustMatchTheirHoldersDigest) {
  CheckpointLedger ledger(shards_, /*keep_last=*/2);
  EXPECT_EQ(Record(&ledger, Report("worker-0", 4, AllShards()), 1), 0);
  control::CheckpointReport bad = Report("worker-1", 4, AllShards(), true);
  bad.mutable_shards(5)->set_digest("not-the-holders");
  auto refused = ledger.Record(bad, 1);
  ASSERT_EQ(refused.status().code(), StatusCode::kDataLoss)
      << refused.status().ToString();
  EXPECT_NE(refused.status().message().find(shards_[5].ToString() +
                                            " at step 4 on worker-1"),
            std::string::npos)
      << refused.status().ToString();
  EXPECT_TRUE(ledger.committed().empty());
  EXPECT_EQ(Record(&ledger, Report("worker-2", 4, AllShards(), true), 1), 4);
  EXPECT_EQ(ledger.committed()[0].replicas(5), "worker-2");
  // Before the holder: recorded, but a wrong copy never makes the commit.
  control::CheckpointReport early = Report("worker-1", 6, AllShards(), true);
  early.mutable_shards(0)->set_digest("stale");
  EXPECT_EQ(Record(&ledger, early, 1), 0);
  EXPECT_EQ(Record(&ledger, Report("worker-0", 6, AllShards()), 1), 0);
  EXPECT_EQ(Steps(ledger), (std::vector<int64_t>{4}));
}

TEST_F(CheckpointLedgerTest, RefusesUnknownShardsAndNonPositiveStepsWhole) {
  CheckpointLedger ledger(shards_, /*keep_last=*/2);
  std::vector<int> all_but_last = AllShards();
  all_but_last.pop_back();
  const int last = static_cast<int>(shards_.size()) - 1;
  // Every shard but the last, and one the model lacks: refused, and none
  // of it recorded, so the last shard alone commits nothing.
  control::CheckpointReport bad = Report("worker-0", 5, all_but_last);
  *bad.add_shards()->mutable_shard() =
      ToShardRef(ShardId::Expert(/*layer=*/0, /*expert=*/99, /*shard=*/0));
  auto refused = ledger.Record(bad, 0);
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("not in the model"),
            std::string::npos)
      << refused.status().message();
  EXPECT_EQ(Record(&ledger, Report("worker-0", 5, {last})), 0);
  EXPECT_TRUE(ledger.committed().empty());

  for (int64_t step : {0, -3}) {
    auto r = ledger.Record(Report("worker-0", step, AllShards()), 0);
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << step;
  }
  EXPECT_TRUE(ledger.committed().empty());
}

TEST_F(CheckpointLedgerTest, IgnoresReportsAtOrBelowTheNewestCommit) {
  CheckpointLedger ledger(shards_, /*keep_last=*/3);
  std::vector<int> half = AllShards();
  half.resize(half.size() / 2);
  std::vector<int> rest = AllShards();
  rest.erase(rest.begin(), rest.begin() + half.size());
  // Step 8 half reported, then step 10 committed whole.
  EXPECT_EQ(Record(&ledger, Report("worker-0", 8, half)), 0);
  CommitWhole(&ledger, 10, "worker-0");
  const uint64_t version = ledger.version();
  // Step 8 completing later is stale: nothing is recorded or committed.
  for (const auto& stale :
       {Report("worker-1", 8, rest), Report("worker-1", 10, AllShards()),
        Report("worker-1", 9, AllShards(), true)}) {
    auto outcome = ledger.Record(stale, 0);
    ASSERT_TRUE(outcome.ok()) << outcome.status().ToString();
    EXPECT_FALSE(outcome->recorded) << stale.step();
    EXPECT_EQ(outcome->committed_step, 0) << stale.step();
  }
  EXPECT_EQ(Steps(ledger), std::vector<int64_t>{10});
  EXPECT_EQ(ledger.committed()[0].holder(0), "worker-0");
  EXPECT_EQ(ledger.version(), version);
  // A newer step is recorded again.
  EXPECT_EQ(Record(&ledger, Report("worker-1", 12, AllShards())), 12);
  EXPECT_EQ(Steps(ledger), (std::vector<int64_t>{10, 12}));
}

TEST_F(CheckpointLedgerTest, KeepsTheNewestKeepLast) {
  struct Case {
    int keep_last;
    std::vector<int64_t> kept;
  };
  for (const Case& c : {Case{2, {20, 30}}, Case{3, {10, 20, 30}}, Case{0, {30}},
                        Case{1, {30}}}) {
    SCOPED_TRACE("keep_last " + std::to_string(c.keep_last));
    CheckpointLedger ledger(shards_, c.keep_last);
    for (int64_t step : {10, 20, 30}) CommitWhole(&ledger, step);
    EXPECT_EQ(Steps(ledger), c.kept);
    EXPECT_EQ(ledger.latest_committed_step(), 30);
    EXPECT_EQ(ledger.keep_from_step(), c.kept.front());
    EXPECT_EQ(ledger.Find(10) != nullptr, c.kept.front() == 10);
    ASSERT_NE(ledger.Find(30), nullptr);
    EXPECT_EQ(ledger.Find(30)->step(), 30);
  }
}

TEST_F(CheckpointLedgerTest, ResumesFromTheNewestCommitUnlessToldOtherwise) {
  CheckpointLedger empty(shards_, /*keep_last=*/3);
  ASSERT_TRUE(empty.ChooseResumeStep(/*fresh=*/false, 0).ok());
  EXPECT_EQ(empty.resume_step(), 0);

  CheckpointLedger ledger(shards_, /*keep_last=*/3);
  for (int64_t step : {4, 8, 12}) CommitWhole(&ledger, step);
  ASSERT_TRUE(ledger.ChooseResumeStep(/*fresh=*/false, 0).ok());
  EXPECT_EQ(ledger.resume_step(), 12);

  // A step that was never committed: refused, naming what is.
  Status missing = ledger.ChooseResumeStep(/*fresh=*/false, 6);
  EXPECT_EQ(missing.code(), StatusCode::kNotFound);
  EXPECT_NE(missing.message().find("(committed: 4 8 12)"), std::string::npos)
      << missing.message();
  EXPECT_EQ(ledger.resume_step(), 12);

  // An older one: the later checkpoints belong to an abandoned future.
  const uint64_t version = ledger.version();
  ASSERT_TRUE(ledger.ChooseResumeStep(/*fresh=*/false, 8).ok());
  EXPECT_EQ(ledger.resume_step(), 8);
  EXPECT_EQ(Steps(ledger), (std::vector<int64_t>{4, 8}));
  EXPECT_GT(ledger.version(), version);

  // Fresh: nothing committed is left.
  ASSERT_TRUE(ledger.ChooseResumeStep(/*fresh=*/true, 0).ok());
  EXPECT_EQ(ledger.resume_step(), 0);
  EXPECT_TRUE(ledger.committed().empty());
  EXPECT_EQ(ledger.latest_committed_step(), 0);
  EXPECT_EQ(ledger.keep_from_step(), 0);
}

TEST_F(CheckpointLedgerTest, ARestartKeepsTheCommittedAndForgetsThePending) {
  CheckpointLedger before(shards_, /*keep_last=*/3);
  CommitWhole(&before, 4, "worker-0");
  CommitWhole(&before, 8, "worker-1");
  std::vector<int> half = AllShards();
  half.resize(half.size() / 2);
  std::vector<int> rest = AllShards();
  rest.erase(rest.begin(), rest.begin() + half.size());
  EXPECT_EQ(Record(&before, Report("worker-0", 12, half)), 0);

  // What the coordinator writes to its store and reads back at a restart.
  control::CoordinatorSnapshot saved;
  saved.set_epoch(7);
  before.SaveTo(&saved);
  control::CoordinatorSnapshot loaded;
  ASSERT_TRUE(loaded.ParseFromString(saved.SerializeAsString()));
  EXPECT_EQ(loaded.epoch(), 7u);

  CheckpointLedger after(shards_, /*keep_last=*/3);
  const uint64_t version = after.version();
  after.Restore(loaded);
  EXPECT_GT(after.version(), version);
  ASSERT_EQ(Steps(after), (std::vector<int64_t>{4, 8}));
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(after.committed()[i].SerializeAsString(),
              before.committed()[i].SerializeAsString());
  }
  ASSERT_TRUE(after.ChooseResumeStep(/*fresh=*/false, 0).ok());
  EXPECT_EQ(after.resume_step(), 8);
  EXPECT_EQ(after.keep_from_step(), 4);
  // Step 12's first half died with the old process: the rest alone does
  // not commit it; the first half reported again does.
  EXPECT_EQ(Record(&after, Report("worker-1", 12, rest)), 0);
  EXPECT_EQ(Record(&after, Report("worker-0", 12, half)), 12);
  // Saving again replaces the committed list rather than appending to it.
  after.SaveTo(&saved);
  EXPECT_EQ(saved.committed_size(), 3);
}

}  // namespace
}  // namespace switchyard::coordinator
