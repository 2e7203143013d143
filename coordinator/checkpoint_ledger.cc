#include "coordinator/checkpoint_ledger.h"

#include <glog/logging.h>

#include <algorithm>
#include <chrono>
#include <sstream>
#include <utility>

#include "common/shard_ref.h"

namespace switchyard::coordinator {

CheckpointLedger::CheckpointLedger(std::vector<ShardId> shards, int keep_last)
    : shards_(std::move(shards)),
      keep_last_(static_cast<size_t>(std::max(1, keep_last))) {
  for (size_t i = 0; i < shards_.size(); ++i) {
    shard_index_[shards_[i]] = static_cast<int>(i);
  }
}

void CheckpointLedger::Restore(const control::CoordinatorSnapshot& snapshot) {
  committed_.assign(snapshot.committed().begin(), snapshot.committed().end());
  pending_.clear();
  resume_step_ = 0;
  ++version_;
}

void CheckpointLedger::SaveTo(control::CoordinatorSnapshot* snapshot) const {
  snapshot->clear_committed();
  for (const auto& c : committed_) *snapshot->add_committed() = c;
}

StatusOr<CheckpointLedger::Outcome> CheckpointLedger::Record(
    const control::CheckpointReport& report, size_t replicas_wanted) {
  if (report.step() <= 0) {
    return InvalidArgumentError("checkpoint report for step " +
                                std::to_string(report.step()));
  }
  Outcome outcome;
  if (report.step() <= latest_committed_step()) {
    // A replica of a committed checkpoint (a drained worker's copies, made
    // again on the shards' new homes) joins its replicas; anything else
    // older than what is committed changes nothing.
    if (report.replica()) AddReplicas(report);
    return outcome;
  }
  // A report naming a shard outside the model is refused whole, before
  // anything of it is recorded.
  std::vector<int> indices;
  for (const auto& s : report.shards()) {
    const ShardId id = FromShardRef(s.shard());
    auto found = shard_index_.find(id);
    if (found == shard_index_.end()) {
      return InvalidArgumentError("checkpoint report names shard " +
                                  id.ToString() + ", not in the model");
    }
    indices.push_back(found->second);
  }
  Reports& reported = pending_[report.step()];
  if (report.replica()) {
    // A copy that differs from what its holder wrote is not a replica.
    for (int i = 0; i < report.shards_size(); ++i) {
      auto it = reported.find(indices[i]);
      if (it != reported.end() && !it->second.holder.empty() &&
          it->second.digest != report.shards(i).digest()) {
        return DataLossError(
            "replica of " + FromShardRef(report.shards(i).shard()).ToString() +
            " at step " + std::to_string(report.step()) + " on " +
            report.name() + " has digest " + report.shards(i).digest() +
            ", its holder " + it->second.holder + " wrote " +
            it->second.digest + ": not counted");
      }
    }
  }
  outcome.recorded = true;
  for (int i = 0; i < report.shards_size(); ++i) {
    const auto& s = report.shards(i);
    ReportedShard& r = reported[indices[i]];
    if (report.replica()) {
      r.replicas[report.name()] = s.digest();
    } else {
      r.holder = report.name();
      r.digest = s.digest();
      r.bytes = s.bytes();
    }
  }
  if (!Complete(reported, replicas_wanted)) return outcome;
  Commit(report.step(), reported);
  outcome.committed_step = report.step();
  return outcome;
}

void CheckpointLedger::AddReplicas(const control::CheckpointReport& report) {
  for (auto& c : committed_) {
    if (c.step() != report.step()) continue;
    for (const auto& s : report.shards()) {
      auto found = shard_index_.find(FromShardRef(s.shard()));
      if (found == shard_index_.end()) continue;
      const int i = found->second;
      if (i >= c.digest_size() || i >= c.replicas_size() ||
          c.digest(i) != s.digest() || c.holder(i) == report.name()) {
        continue;  // Not the committed copy.
      }
      std::string* replicas = c.mutable_replicas(i);
      if (("," + *replicas + ",").find("," + report.name() + ",") !=
          std::string::npos) {
        continue;
      }
      *replicas += (replicas->empty() ? "" : ",") + report.name();
      ++version_;
    }
  }
}

bool CheckpointLedger::OnlyCopiesOn(const std::string& name) const {
  for (const control::CommittedCheckpoint& c : committed_) {
    for (int i = 0; i < c.holder_size(); ++i) {
      if (c.holder(i) != name) continue;
      if (i >= c.replicas_size()) return true;
      std::stringstream names(c.replicas(i));
      bool elsewhere = false;
      for (std::string n; std::getline(names, n, ',');) elsewhere |= n != name;
      if (!elsewhere) return true;
    }
  }
  return false;
}

bool CheckpointLedger::Complete(const Reports& reported,
                                size_t replicas_wanted) const {
  // Every shard durable on its holder and on the replicas wanted.
  if (reported.size() < shards_.size()) return false;
  for (const auto& [index, r] : reported) {
    if (r.holder.empty() || MatchingReplicas(r) < replicas_wanted) return false;
  }
  return true;
}

size_t CheckpointLedger::MatchingReplicas(const ReportedShard& r) {
  size_t n = 0;
  for (const auto& [name, digest] : r.replicas) n += digest == r.digest;
  return n;
}

void CheckpointLedger::Commit(int64_t step, const Reports& reported) {
  control::CommittedCheckpoint commit;
  commit.set_step(step);
  commit.set_committed_unix_ms(
      std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::system_clock::now().time_since_epoch())
          .count());
  commit.set_shards(static_cast<int32_t>(shards_.size()));
  uint64_t bytes = 0;
  for (const auto& [index, r] : reported) {
    commit.add_holder(r.holder);
    commit.add_digest(r.digest);
    std::string replicas;
    for (const auto& [name, digest] : r.replicas) {
      if (digest != r.digest) continue;  // A copy that does not match.
      replicas += (replicas.empty() ? "" : ",") + name;
    }
    commit.add_replicas(replicas);
    bytes += r.bytes;
  }
  commit.set_bytes(bytes);
  committed_.push_back(commit);
  while (committed_.size() > keep_last_) committed_.erase(committed_.begin());
  // `reported` is pending_[step]: erased here, with every older step.
  pending_.erase(pending_.begin(), pending_.upper_bound(step));
  ++version_;
  LOG(INFO) << "coordinator: checkpoint " << step << " committed ("
            << shards_.size() << " shards, " << bytes << " bytes)";
}

Status CheckpointLedger::ChooseResumeStep(bool fresh, int64_t from_step) {
  if (fresh) {
    if (!committed_.empty()) {
      LOG(WARNING) << "coordinator: --fresh: starting from scratch; the "
                   << committed_.size()
                   << " committed checkpoints are forgotten";
    }
    committed_.clear();
    resume_step_ = 0;
    ++version_;
    return OkStatus();
  }
  if (from_step > 0) {
    if (Find(from_step) != nullptr) {
      resume_step_ = from_step;
      // Later checkpoints belong to the abandoned future.
      while (committed_.back().step() > from_step) committed_.pop_back();
      ++version_;
      return OkStatus();
    }
    std::string have;
    for (const auto& c : committed_) have += " " + std::to_string(c.step());
    return NotFoundError(
        "no committed checkpoint at step " + std::to_string(from_step) +
        " (committed:" + (have.empty() ? " none" : have) + ")");
  }
  resume_step_ = latest_committed_step();
  return OkStatus();
}

const control::CommittedCheckpoint* CheckpointLedger::Find(int64_t step) const {
  for (const auto& c : committed_) {
    if (c.step() == step) return &c;
  }
  return nullptr;
}

}  // namespace switchyard::coordinator
