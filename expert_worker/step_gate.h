// The step gate: which data-plane requests a worker may serve now
// (DESIGN.md, "One synchronous training step"). A request must carry the
// worker's routing epoch (older: refused for good; newer, or the worker's
// own while its shards for it are being made: refused as not ready,
// ABORTED, so that the sender retries), a trainer rank in
// [0, trainers), and the step the worker is at: requests for step t + 1 are
// deferred until update t is applied, earlier and later steps are refused.
// The gate also counts StepDone(t, rank): update t is due when every
// trainer's has come. And it gathers expert forwards and backwards: one
// shard's requests of a micro-batch and phase are computed together, over
// every trainer's rows in rank order (one GEMM rather than one per
// trainer, and results that depend on the step's tokens, never on which
// trainer's request came first).
//
// Thread-compatible: the worker holds its state lock around every call.
#ifndef SWITCHYARD_EXPERT_WORKER_STEP_GATE_H_
#define SWITCHYARD_EXPERT_WORKER_STEP_GATE_H_

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "common/status.h"
#include "expert_worker/worker_task.h"
#include "transport/wire_header.h"

namespace switchyard::expert_worker {

class StepGate {
 public:
  StepGate(std::string name, int trainers)
      : name_(std::move(name)), trainers_(trainers) {}

  // OK when `h` carries this epoch; else why not (see above).
  Status CheckEpoch(const transport::WireHeader& h) const;

  enum class Verdict { kServe, kDefer, kRefuse };
  // Whether `h`'s step and rank may be served now, later (Defer), or never
  // (*why says why).
  Verdict Admit(const transport::WireHeader& h, Status* why) const;
  // Holds `task` (a kDefer verdict's) until the update before it.
  void Defer(Task task) { deferred_.push_back(std::move(task)); }

  // Holds an admitted expert forward or backward until the request of
  // every rank for the same (step, micro-batch, shard, kind) has come; then
  // hands back all of them, in rank order. Meanwhile it returns an empty
  // vector (the task is kept). A second request of one rank is refused
  // (ALREADY_EXISTS) and left in *task.
  StatusOr<std::vector<Task>> Gather(Task* task);

  // Records StepDone(step, rank) of an admitted request; true when it
  // completes the step (every rank's has come).
  bool MarkDone(int64_t step, int32_t rank);
  // Update next_step() was applied: the gate moves to the next step and
  // hands back the requests deferred for it, in arrival order, and then
  // any still gathering for the applied step (their other ranks never came:
  // run again, they are refused as late).
  std::vector<Task> Advance();

  // A routing table of a newer epoch arrived: from now on requests of
  // older epochs are refused for good, and those of `epoch` are answered
  // not ready (ABORTED: the sender retries) until Open. The step in
  // flight is abandoned: its StepDone marks are dropped and its deferred
  // and gathering requests handed back (to be refused).
  std::vector<Task> Fence(uint64_t epoch);
  // The shards of the fenced epoch are in place at `next_step`: requests of
  // the epoch are served.
  void Open(int64_t next_step) {
    next_step_ = next_step;
    open_ = true;
  }
  bool open() const { return open_; }
  // Every deferred and gathering request (shutdown answers them).
  std::vector<Task> TakeDeferred();

  uint64_t epoch() const { return epoch_; }
  int64_t next_step() const { return next_step_; }
  size_t num_deferred() const { return deferred_.size(); }

 private:
  const std::string name_;
  const int trainers_;
  uint64_t epoch_ = 0;
  bool open_ = false;                          // Serving epoch_.
  int64_t next_step_ = 0;                      // = updates applied.
  std::map<int64_t, std::set<int32_t>> done_;  // StepDone ranks by step.
  std::vector<Task> deferred_;
  // Expert requests gathering, by (step, micro-batch, layer, expert, shard,
  // kind): one slot per rank.
  using GatherKey =
      std::tuple<int64_t, int32_t, int32_t, int32_t, int32_t, uint8_t>;
  std::map<GatherKey, std::vector<std::optional<Task>>> gathering_;
};

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_STEP_GATE_H_
