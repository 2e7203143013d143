#include "expert_worker/checkpoint_writer.h"

#include <chrono>
#include <optional>
#include <utility>

#include "common/finite.h"
#include "common/ids.h"
#include "common/metrics.h"
#include "common/shard_ref.h"
#include "common/thread_name.h"
#include "expert_worker/hosted_shard.h"

namespace switchyard::expert_worker {

CheckpointWriter::CheckpointWriter(std::string name,
                                   storage::CheckpointStore* store,
                                   BufferPool* staging_pool, int threads,
                                   Reporter report, Replicator replicate,
                                   int max_consecutive_failures,
                                   bool keep_in_memory)
    : name_(std::move(name)),
      store_(store),
      staging_pool_(staging_pool),
      threads_(threads),
      report_(std::move(report)),
      replicate_(std::move(replicate)),
      max_consecutive_failures_(max_consecutive_failures),
      keep_in_memory_(keep_in_memory) {}

void CheckpointWriter::Start() {
  thread_ = StartNamedThread("sy-ckpt", [this] { Loop(); });
}

void CheckpointWriter::Shutdown() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  cv_.NotifyAll();
  if (thread_.joinable()) thread_.join();
}

void CheckpointWriter::Loop() {
  while (true) {
    std::vector<storage::ShardSnapshot> job;
    uint64_t incarnation = 0;
    std::optional<control::ReplicationTask> replication;
    {
      MutexLock lock(&mu_);
      while (!stop_ && staged_.empty() && replications_.empty()) {
        if (unreported_.empty()) {
          cv_.Wait(&mu_);
        } else if (!cv_.WaitUntil(
                       &mu_, std::chrono::steady_clock::now() + kReportRetry)) {
          lock.Unlock();
          RetryReports();
          lock.Lock();
        }
      }
      if (staged_.empty() && replications_.empty()) return;  // Stopping.
      if (!staged_.empty()) {
        job = std::move(staged_);
        staged_.clear();
        incarnation = staged_incarnation_;
        if (uncopied_) {
          // Copied without the lock, while the worker serves requests; an
          // update waits for it (WaitForStagingCopy).
          uncopied_ = false;
          copying_ = true;
          lock.Unlock();
          Copy(&job, "in the background");
          lock.Lock();
          copying_ = false;
          cv_.NotifyAll();
        }
      } else {
        replication = std::move(replications_.front());
        replications_.pop_front();
      }
    }
    if (replication) {
      Status s = replicate_(*replication);
      if (!s.ok()) {
        LOG(ERROR) << name_ << ": replicating checkpoint "
                   << replication->step() << " of " << replication->source()
                   << " failed: " << s.ToString();
      }
      continue;
    }
    auto digests = Write(job, incarnation);
    std::shared_ptr<KeptCheckpoint> kept;
    if (digests.has_value() && keep_in_memory_) {
      kept = std::make_shared<KeptCheckpoint>();
      kept->step = job.front().step;
      kept->digests = std::move(*digests);
      for (storage::ShardSnapshot& shard : job) {
        std::string name = shard.shard;
        kept->shards.emplace(std::move(name), std::move(shard));
      }
    }
    job.clear();  // The staging buffers go back before the next can stage.
    {
      MutexLock lock(&mu_);
      if (kept != nullptr) {
        kept_[kept->step] = std::move(kept);
        TrimKept();
      }
      busy_ = !staged_.empty();
    }
    cv_.NotifyAll();
  }
}

std::optional<std::map<std::string, std::string>> CheckpointWriter::Write(
    const std::vector<storage::ShardSnapshot>& job, uint64_t incarnation) {
  const int64_t step = job.front().step;
  const auto start = std::chrono::steady_clock::now();
  control::CheckpointReport report;
  report.set_step(step);
  report.set_incarnation(incarnation);
  Status s = OkStatus();
  uint64_t bytes = 0;
  // Nothing non-finite is ever committed: such a checkpoint is not written
  // (a failure), and the last good one stays.
  for (const auto& shard : job) {
    for (const auto& t : shard.tensors) {
      if (s.ok()) s = CheckFinite(t.tensor, shard.shard + " tensor " + t.name);
    }
  }
  const auto manifests =
      s.ok() ? storage::WriteShards(*store_, job, threads_)
             : std::vector<StatusOr<checkpoint::ShardManifest>>(job.size(), s);
  for (size_t i = 0; s.ok() && i < job.size(); ++i) {
    const auto& manifest = manifests[i];
    if (!manifest.ok()) {
      s = manifest.status();
      break;
    }
    bytes += manifest->total_bytes();
    auto id = ShardId::Parse(job[i].shard);  // Our own names: parse.
    if (!id.ok()) {
      s = id.status();
      break;
    }
    auto* shard = report.add_shards();
    *shard->mutable_shard() = ToShardRef(*id);
    shard->set_digest(manifest->digest());
    shard->set_bytes(manifest->total_bytes());
  }
  const bool reported = s.ok() && Report(report);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  auto& metrics = MetricsRegistry::Global();
  if (!s.ok()) {
    // The coordinator never commits this step, and the previous committed
    // checkpoint stays. Training goes on until max_consecutive_failures
    // (Healthy).
    metrics.GetCounter("switchyard_worker_checkpoints_failed_total")
        ->Increment();
    LOG(ERROR) << name_ << ": checkpoint " << step
               << " failed: " << s.ToString();
    MutexLock lock(&mu_);
    ++consecutive_failures_;
    last_failure_ = s.WithContext("checkpoint " + std::to_string(step));
    return std::nullopt;
  }
  {
    MutexLock lock(&mu_);
    consecutive_failures_ = 0;
  }
  metrics.GetCounter("switchyard_worker_checkpoints_written_total")
      ->Increment();
  metrics.GetCounter("switchyard_worker_checkpoint_bytes_total")
      ->Increment(bytes);
  metrics.GetGauge("switchyard_worker_checkpoint_last_step")
      ->Set(static_cast<double>(step));
  metrics.GetGauge("switchyard_worker_checkpoint_last_write_seconds")
      ->Set(seconds);
  LOG(INFO) << name_ << ": checkpoint " << step << " written (" << job.size()
            << " shards, " << bytes << " bytes in " << seconds << " s)"
            << (reported ? " and reported"
                         : "; reported once the coordinator is back");
  std::map<std::string, std::string> digests;
  for (size_t i = 0; i < job.size(); ++i) {
    digests[job[i].shard] = manifests[i]->digest();
  }
  return digests;
}

void CheckpointWriter::NoteCommitted(int64_t step) {
  MutexLock lock(&mu_);
  if (step <= committed_) return;
  committed_ = step;
  TrimKept();
}

void CheckpointWriter::TrimKept() {
  if (kept_.empty()) return;
  const int64_t newest = kept_.rbegin()->first;
  for (auto it = kept_.begin(); it != kept_.end();) {
    it = it->first == newest || it->first == committed_ ? std::next(it)
                                                        : kept_.erase(it);
  }
}

std::shared_ptr<const KeptCheckpoint> CheckpointWriter::KeptAt(
    int64_t step) const {
  MutexLock lock(&mu_);
  auto it = kept_.find(step);
  return it == kept_.end() ? nullptr : it->second;
}

bool CheckpointWriter::Report(const control::CheckpointReport& report) {
  // Older reports still waiting go first (the writer is not always idle
  // long enough for its timed retries: checkpoints may keep coming).
  RetryReports();
  {
    MutexLock lock(&mu_);
    if (!unreported_.empty()) {
      // Behind the older ones, in step order.
      unreported_.push_back(report);
      return false;
    }
  }
  if (!report_) return true;
  const Status s = report_(report);
  if (s.ok()) return true;
  if (s.code() == StatusCode::kUnavailable ||
      s.code() == StatusCode::kDeadlineExceeded) {
    LOG(WARNING) << name_ << ": checkpoint " << report.step()
                 << " is written but the coordinator cannot be reached ("
                 << s.ToString() << "); reporting it again until it can";
    MutexLock lock(&mu_);
    unreported_.push_back(report);
    return false;
  }
  // Refused (e.g. this incarnation was fenced): the copy is on disk, but
  // it will not count towards a commit.
  LOG(WARNING) << name_ << ": checkpoint " << report.step()
               << " is written but its report was refused: " << s.ToString();
  return true;
}

void CheckpointWriter::RetryReports() {
  while (true) {
    control::CheckpointReport report;
    {
      MutexLock lock(&mu_);
      if (unreported_.empty()) return;
      report = unreported_.front();
    }
    const Status s = report_(report);
    if (!s.ok() && (s.code() == StatusCode::kUnavailable ||
                    s.code() == StatusCode::kDeadlineExceeded)) {
      return;  // Still away: the next retry.
    }
    if (s.ok()) {
      LOG(INFO) << name_ << ": checkpoint " << report.step()
                << " reported (the coordinator is back)";
    } else {
      LOG(WARNING) << name_ << ": checkpoint " << report.step()
                   << " report refused: " << s.ToString();
    }
    MutexLock lock(&mu_);
    unreported_.pop_front();
  }
}

Status CheckpointWriter::Healthy() const {
  MutexLock lock(&mu_);
  if (max_consecutive_failures_ <= 0 ||
      consecutive_failures_ < max_consecutive_failures_) {
    return OkStatus();
  }
  return ResourceExhaustedError(
      name_ + ": the last " + std::to_string(consecutive_failures_) +
      " checkpoints failed (checkpoint.max_consecutive_failures = " +
      std::to_string(max_consecutive_failures_) +
      "); the run stops instead of training on work it cannot save. The "
      "last failure: " +
      last_failure_.ToString());
}

void CheckpointWriter::Stage(std::vector<storage::ShardSnapshot> refs,
                             bool run_ends, uint64_t incarnation) {
  if (refs.empty()) return;
  const int64_t step = refs.front().step;
  {
    MutexLock lock(&mu_);
    if (busy_ && !run_ends) {
      MetricsRegistry::Global()
          .GetCounter("switchyard_worker_checkpoints_skipped_total")
          ->Increment();
      LOG(WARNING) << name_ << ": checkpoint " << step
                   << " skipped: the previous one is still being written";
      return;
    }
    // References now; the copy is made while the next step's requests are
    // served. The run's last checkpoint is never skipped: with a write in
    // flight it is queued behind it, without waiting (the update staging
    // it answers the trainers' StepDone). The thread copies it once that
    // write has returned its staging buffers; no update follows the run's
    // end to change the shards before (one that did would copy it first,
    // WaitForStagingCopy).
    if (busy_) {
      LOG(INFO) << name_ << ": checkpoint " << step
                << " (the run's end) is queued behind the previous write";
    }
    if (!staged_.empty()) {
      // Counted as skipped: every checkpoint due is written, failed or
      // skipped.
      MetricsRegistry::Global()
          .GetCounter("switchyard_worker_checkpoints_skipped_total")
          ->Increment();
      LOG(WARNING) << name_ << ": checkpoint " << staged_.front().step
                   << " was not begun; the run's last, " << step
                   << ", replaces it";
    }
    staged_ = std::move(refs);
    staged_incarnation_ = incarnation;
    uncopied_ = true;
    busy_ = true;
  }
  cv_.NotifyAll();
}

Status CheckpointWriter::WaitForStagingCopy(int64_t step) {
  const auto start = std::chrono::steady_clock::now();
  MutexLock lock(&mu_);
  if (uncopied_) {
    Copy(&staged_, "by the next update");
    uncopied_ = false;
  }
  // A copy is a memcpy of the shards (milliseconds); the deadline is only
  // there so that nothing waits forever.
  const auto deadline = start + std::chrono::seconds(60);
  while (copying_) {
    if (!cv_.WaitUntil(&mu_, deadline) && copying_) {
      return InternalError(name_ + ": update " + std::to_string(step) +
                           " waited 60 s for a checkpoint's staging copy");
    }
  }
  const double ms = std::chrono::duration<double, std::milli>(
                        std::chrono::steady_clock::now() - start)
                        .count();
  if (ms > 1) {
    LOG(INFO) << name_ << ": update " << step << " waited " << ms
              << " ms for a checkpoint's staging copy";
  }
  return OkStatus();
}

void CheckpointWriter::Copy(std::vector<storage::ShardSnapshot>* job,
                            const char* how) const {
  const auto start = std::chrono::steady_clock::now();
  for (storage::ShardSnapshot& s : *job) {
    for (auto& t : s.tensors) {
      t.tensor = CopyTensor(*staging_pool_, t.tensor, /*deep=*/true);
    }
  }
  LOG(INFO) << name_ << ": checkpoint "
            << (job->empty() ? -1 : job->front().step) << " staged in "
            << std::chrono::duration<double, std::milli>(
                   std::chrono::steady_clock::now() - start)
                   .count()
            << " ms " << how;
}

void CheckpointWriter::Replicate(control::ReplicationTask task) {
  {
    MutexLock lock(&mu_);
    replications_.push_back(std::move(task));
  }
  cv_.NotifyAll();
}

void CheckpointWriter::WaitWritten() {
  MutexLock lock(&mu_);
  while (busy_) cv_.Wait(&mu_);
}

void CheckpointWriter::DropBefore(int64_t step) {
  {
    MutexLock lock(&mu_);
    if (step <= dropped_before_) return;
    dropped_before_ = step;
  }
  Status s = store_->DropSteps(0, step);
  if (!s.ok()) {
    LOG(WARNING) << name_ << ": cannot drop checkpoints before step " << step
                 << ": " << s.ToString();
  }
}

}  // namespace switchyard::expert_worker
