// The coordinator's ledger of checkpoints: which shards are durable at which
// step, which checkpoints are committed, and where training resumes.
//
// A checkpoint at step t is committed when every shard of the model (experts
// and dense tables) has been reported durable by its holder and by at least
// the replicas wanted (checkpoint.replicas, bounded by the live workers):
// whole or not at all (docs/protocol.md, "Checkpoints"). The newest
// `keep_last` committed checkpoints are kept, oldest first; a report for a
// step at or below the newest committed one changes nothing.
//
// NOTE: only the committed list is durable (SaveTo/Restore, inside the
// coordinator's snapshot in its KvStore); reports of steps not yet committed
// are held in memory and forgotten by a restart.
//
// Membership is not its business: callers check that a report comes from a
// current worker, and choose the replication targets (ClusterState).
//
// Thread-compatible: the owner (ClusterState) serializes all calls. Pointers
// and references it returns stay valid until the next non-const call.
#ifndef SWITCHYARD_COORDINATOR_CHECKPOINT_LEDGER_H_
#define SWITCHYARD_COORDINATOR_CHECKPOINT_LEDGER_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/ids.h"
#include "common/status.h"
#include "control.pb.h"
#include "coordinator_state.pb.h"

namespace switchyard::coordinator {

class CheckpointLedger {
 public:
  // `shards`: every shard of the model, in ModelShards() order (the order of
  // a committed checkpoint's holder, digest and replicas lists). A
  // `keep_last` below 1 keeps one.
  CheckpointLedger(std::vector<ShardId> shards, int keep_last);

  // Takes the committed list of a persisted snapshot (a restart); nothing is
  // pending afterwards. The resume step is chosen again (ChooseResumeStep).
  void Restore(const control::CoordinatorSnapshot& snapshot);
  // Writes the committed list into `snapshot` (its `committed` field).
  void SaveTo(control::CoordinatorSnapshot* snapshot) const;

  // What Record did with a report.
  struct Outcome {
    // False when the report's step was already committed or older: nothing
    // was recorded (and nothing should be replicated).
    bool recorded = false;
    // The report's step when it completed that checkpoint, else 0.
    int64_t committed_step = 0;
  };
  // Records that report.name() holds report.shards() durably at
  // report.step(), as their holder or (report.replica()) as a replica, and
  // commits the step once every shard has a holder and `replicas_wanted`
  // replicas whose digests equal the holder's. DATA_LOSS, with nothing
  // recorded, for a replica whose copy's digest differs from its holder's.
  // INVALID_ARGUMENT, with nothing recorded, for a step <= 0 or a
  // shard outside the model. Precondition: report.name() is a current
  // worker.
  StatusOr<Outcome> Record(const control::CheckpointReport& report,
                           size_t replicas_wanted);

  // Where training (re)starts: from scratch with `fresh` (forgetting every
  // committed checkpoint), else from committed checkpoint `from_step`
  // (dropping the later ones), or the newest with `from_step` 0. NOT_FOUND
  // when `from_step` is not committed.
  Status ChooseResumeStep(bool fresh, int64_t from_step);
  int64_t resume_step() const { return resume_step_; }
  // A member died or the placement changed mid-run: training continues from
  // the newest committed checkpoint (0: none), which becomes the resume
  // step, and reports of later steps not yet committed are forgotten (the
  // members report them again once they have trained there again).
  void RollBack() {
    resume_step_ = latest_committed_step();
    pending_.clear();
  }
  // The cluster continues, without rolling back, from `step` (the step
  // its workers reached: ClusterState's hold): reports pending stay.
  void ContinueAt(int64_t step) { resume_step_ = step; }
  // Whether some shard of a committed checkpoint (any kept: a rollback
  // goes to the newest, `--from-step` and `ckpt export` to any) is held
  // only by `name`, with no replica elsewhere.
  bool OnlyCopiesOn(const std::string& name) const;

  // Committed checkpoints, oldest first.
  const std::vector<control::CommittedCheckpoint>& committed() const {
    return committed_;
  }
  // The committed checkpoint at `step`, or nullptr.
  const control::CommittedCheckpoint* Find(int64_t step) const;
  // The newest committed step, 0 when none.
  int64_t latest_committed_step() const {
    return committed_.empty() ? 0 : committed_.back().step();
  }
  // The oldest step a worker must keep (the oldest committed), 0 when none.
  int64_t keep_from_step() const {
    return committed_.empty() ? 0 : committed_.front().step();
  }
  // Incremented on every change to what SaveTo writes.
  uint64_t version() const { return version_; }

 private:
  // A replica report of a committed checkpoint: its matching copies join
  // the commit's replicas.
  void AddReplicas(const control::CheckpointReport& report);
  // One shard's reports at one step.
  struct ReportedShard {
    std::string holder;  // "" until its holder reports.
    std::string digest;
    uint64_t bytes = 0;
    // Replica holder -> the digest of its copy. Only copies whose digest is
    // the holder's count.
    std::map<std::string, std::string> replicas;
  };
  // The replicas of `r` whose copies match its holder's.
  static size_t MatchingReplicas(const ReportedShard& r);
  using Reports = std::map<int, ReportedShard>;  // By shard index.

  bool Complete(const Reports& reported, size_t replicas_wanted) const;
  void Commit(int64_t step, const Reports& reported);

  const std::vector<ShardId> shards_;
  std::map<ShardId, int> shard_index_;  // Position in shards_.
  const size_t keep_last_;
  std::vector<control::CommittedCheckpoint> committed_;
  std::map<int64_t, Reports> pending_;  // By step; all above the newest commit.
  int64_t resume_step_ = 0;
  uint64_t version_ = 0;
};

}  // namespace switchyard::coordinator

#endif  // SWITCHYARD_COORDINATOR_CHECKPOINT_LEDGER_H_
