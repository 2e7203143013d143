#include "expert_worker/step_gate.h"

#include <utility>

namespace switchyard::expert_worker {

Status StepGate::CheckEpoch(const transport::WireHeader& h) const {
  if (h.epoch < epoch_) {
    return FailedPreconditionError(
        "stale epoch " + std::to_string(h.epoch) + ": " + name_ +
        " is at epoch " + std::to_string(epoch_) + "; refresh the routing");
  }
  if (h.epoch > epoch_) {
    // ABORTED: nothing done, the sender retries (transport::SendAll).
    return AbortedError(name_ + " has not seen epoch " +
                        std::to_string(h.epoch) + " yet (at " +
                        std::to_string(epoch_) + "); retry");
  }
  if (!open_) {
    return AbortedError(name_ + " is still making its shards for epoch " +
                        std::to_string(epoch_) + "; retry");
  }
  return OkStatus();
}

std::vector<Task> StepGate::Fence(uint64_t epoch) {
  epoch_ = epoch;
  open_ = false;
  done_.clear();
  return TakeDeferred();
}

StepGate::Verdict StepGate::Admit(const transport::WireHeader& h,
                                  Status* why) const {
  if (h.step < next_step_) {
    *why = FailedPreconditionError("step " + std::to_string(h.step) +
                                   " is already applied (next step " +
                                   std::to_string(next_step_) + ")");
    return Verdict::kRefuse;
  }
  if (h.step == next_step_ + 1) return Verdict::kDefer;
  if (h.step > next_step_) {
    *why = FailedPreconditionError("step " + std::to_string(h.step) +
                                   " is ahead of step " +
                                   std::to_string(next_step_));
    return Verdict::kRefuse;
  }
  if (h.trainer_rank < 0 || h.trainer_rank >= trainers_) {
    *why = InvalidArgumentError(
        "trainer rank " + std::to_string(h.trainer_rank) + " is outside [0, " +
        std::to_string(trainers_) + ")");
    return Verdict::kRefuse;
  }
  return Verdict::kServe;
}

bool StepGate::MarkDone(int64_t step, int32_t rank) {
  auto& done = done_[step];
  done.insert(rank);
  if (static_cast<int>(done.size()) < trainers_) return false;
  done_.erase(step);
  return true;
}

StatusOr<std::vector<Task>> StepGate::Gather(Task* task) {
  const transport::WireHeader& h = task->request.header;
  auto& slots =
      gathering_[{h.step, h.micro_batch, h.layer, h.expert, h.shard, h.kind}];
  slots.resize(trainers_);
  if (slots[h.trainer_rank].has_value()) {
    return AlreadyExistsError("duplicate request: " +
                              transport::DescribeHeader(h));
  }
  slots[h.trainer_rank] = std::move(*task);
  std::vector<Task> all;
  for (const auto& slot : slots) {
    if (!slot.has_value()) return all;  // Others still to come.
  }
  for (auto& slot : slots) all.push_back(*std::move(slot));
  gathering_.erase({h.step, h.micro_batch, h.layer, h.expert, h.shard, h.kind});
  return all;
}

std::vector<Task> StepGate::Advance() {
  ++next_step_;
  std::vector<Task> tasks = std::move(deferred_);
  deferred_.clear();
  // Gathers of the applied step can no longer complete (every trainer
  // finished it): run again, they are refused as late.
  for (auto it = gathering_.begin(); it != gathering_.end();) {
    if (std::get<0>(it->first) >= next_step_) {
      ++it;
      continue;
    }
    for (auto& slot : it->second) {
      if (slot.has_value()) tasks.push_back(*std::move(slot));
    }
    it = gathering_.erase(it);
  }
  return tasks;
}

std::vector<Task> StepGate::TakeDeferred() {
  std::vector<Task> tasks = std::move(deferred_);
  deferred_.clear();
  for (auto& [key, slots] : gathering_) {
    for (auto& slot : slots) {
      if (slot.has_value()) tasks.push_back(*std::move(slot));
    }
  }
  gathering_.clear();
  return tasks;
}

}  // namespace switchyard::expert_worker
