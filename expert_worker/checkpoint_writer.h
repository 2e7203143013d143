// The worker's checkpoint writer (DESIGN.md, "Checkpoints"). At a step
// boundary the worker stages its shards as references to the live tensors
// (Stage); they are copied into staging buffers while the next step's
// requests are served, by the writer's thread or, if that thread has not
// begun, by the next update (WaitForStagingCopy: the update is what changes
// the live tensors, so it copies first, or waits for a copy under way).
// The thread then writes the copy to the store and reports the manifests'
// digests. One checkpoint is in flight at a time: one due while another is
// written is skipped (training never waits for the disk), except the run's
// last, which is queued behind the write. Between checkpoints the thread
// runs replication tasks (copies of peers' checkpoints).
//
// A written checkpoint whose report cannot reach the coordinator
// (UNAVAILABLE or DEADLINE_EXCEEDED: it is restarting) is kept and
// reported again, oldest first, every kReportRetry until it gets through:
// training goes on while the coordinator is away, and its commits follow
// when it returns. Only failures to write count against
// max_consecutive_failures.
//
// With `keep_in_memory`, a written checkpoint's staging copy is kept
// rather than returned to the pool: the newest written one and the newest
// committed one (NoteCommitted), so that a rollback to the committed
// checkpoint reads no disk (KeptAt).
//
// Thread-safety: every method is thread-safe. The store, the staging pool
// and the replication runner are not owned and outlive the writer.
#ifndef SWITCHYARD_EXPERT_WORKER_CHECKPOINT_WRITER_H_
#define SWITCHYARD_EXPERT_WORKER_CHECKPOINT_WRITER_H_

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/buffer_pool.h"
#include "common/mutex.h"
#include "common/status.h"
#include "control.pb.h"
#include "storage/checkpoint_store.h"

namespace switchyard::expert_worker {

// A written checkpoint kept in memory: deep copies of its shards (never
// changed once kept) and their manifests' digests, by shard name.
struct KeptCheckpoint {
  int64_t step = 0;
  std::map<std::string, storage::ShardSnapshot> shards;
  std::map<std::string, std::string> digests;
};

class CheckpointWriter {
 public:
  using Reporter = std::function<Status(const control::CheckpointReport&)>;
  using Replicator = std::function<Status(const control::ReplicationTask&)>;
  static constexpr std::chrono::milliseconds kReportRetry{200};

  // `threads`: shards written at a time. `report` (may be empty) is called
  // after each write; `replicate` runs a replication task.
  // `max_consecutive_failures` (0: no limit): see Healthy.
  CheckpointWriter(std::string name, storage::CheckpointStore* store,
                   BufferPool* staging_pool, int threads, Reporter report,
                   Replicator replicate, int max_consecutive_failures = 0,
                   bool keep_in_memory = false);
  ~CheckpointWriter() { Shutdown(); }
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  void Start();
  // Finishes the write in flight (it may be committed), then stops.
  void Shutdown() EXCLUDES(mu_);

  // At the step boundary of `refs` (shallow snapshots of every hosted
  // shard, all of one step): stages them for writing, or skips them when a
  // write is in flight and `run_ends` is false (logged, counted).
  // `incarnation`: the worker's incarnation in the routing table the shards
  // were trained under; the report carries it, so that the coordinator
  // refuses a checkpoint taken before a fence (0: unknown, the session
  // stamps its own).
  void Stage(std::vector<storage::ShardSnapshot> refs, bool run_ends,
             uint64_t incarnation = 0) EXCLUDES(mu_);
  // Before update `step` changes the live tensors: copies a staged
  // checkpoint still uncopied, or waits for the copy under way.
  Status WaitForStagingCopy(int64_t step) EXCLUDES(mu_);
  // Queues a replication task for the writer's thread.
  void Replicate(control::ReplicationTask task) EXCLUDES(mu_);
  // Drops checkpoints older than `step` from the store (once per step).
  void DropBefore(int64_t step) EXCLUDES(mu_);
  // Blocks until no checkpoint write is in flight.
  void WaitWritten() EXCLUDES(mu_);
  // OK unless the last max_consecutive_failures checkpoints all failed:
  // then RESOURCE_EXHAUSTED with the last failure, so that the run stops
  // instead of training on work it cannot save. A written checkpoint
  // resets the count.
  Status Healthy() const EXCLUDES(mu_);

  // The coordinator committed `step`: kept copies older than it go.
  void NoteCommitted(int64_t step) EXCLUDES(mu_);
  // The kept copy of checkpoint `step`, or null.
  std::shared_ptr<const KeptCheckpoint> KeptAt(int64_t step) const
      EXCLUDES(mu_);

 private:
  // Drops kept copies but the newest and the newest committed one.
  void TrimKept() REQUIRES(mu_);
  void Loop() EXCLUDES(mu_);
  // Sends the reports the coordinator could not take yet, oldest first,
  // until one fails again.
  void RetryReports() EXCLUDES(mu_);
  // Reports `report` of a written checkpoint; keeps it for RetryReports
  // when the coordinator cannot be reached. False when it was kept.
  bool Report(const control::CheckpointReport& report) EXCLUDES(mu_);
  // Writes `job` and reports it; logs and counts the outcome. A job
  // holding a non-finite value is not written (a failure).
  // The manifests' digests by shard when written, else nothing.
  std::optional<std::map<std::string, std::string>> Write(
      const std::vector<storage::ShardSnapshot>& job, uint64_t incarnation)
      EXCLUDES(mu_);
  // Replaces `job`'s tensors with copies in staging buffers, logging how
  // long that took (`how`: who made it).
  void Copy(std::vector<storage::ShardSnapshot>* job, const char* how) const;

  const std::string name_;
  storage::CheckpointStore* const store_;
  BufferPool* const staging_pool_;
  const int threads_;
  const Reporter report_;
  const Replicator replicate_;
  const int max_consecutive_failures_;
  const bool keep_in_memory_;

  mutable Mutex mu_;
  int consecutive_failures_ GUARDED_BY(mu_) = 0;
  Status last_failure_ GUARDED_BY(mu_);
  CondVar cv_;
  // The checkpoint to write: references to the live tensors while
  // uncopied_, then staging copies (copying_: being made off the lock).
  std::vector<storage::ShardSnapshot> staged_ GUARDED_BY(mu_);
  uint64_t staged_incarnation_ GUARDED_BY(mu_) = 0;
  bool uncopied_ GUARDED_BY(mu_) = false;
  bool copying_ GUARDED_BY(mu_) = false;
  std::deque<control::ReplicationTask> replications_ GUARDED_BY(mu_);
  bool busy_ GUARDED_BY(mu_) = false;  // A checkpoint staged or being written.
  bool stop_ GUARDED_BY(mu_) = false;
  int64_t dropped_before_ GUARDED_BY(mu_) = 0;
  // Written checkpoints not yet reported (the coordinator was away).
  std::deque<control::CheckpointReport> unreported_ GUARDED_BY(mu_);
  std::map<int64_t, std::shared_ptr<const KeptCheckpoint>> kept_
      GUARDED_BY(mu_);
  int64_t committed_ GUARDED_BY(mu_) = 0;
  std::thread thread_;
};

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_CHECKPOINT_WRITER_H_
