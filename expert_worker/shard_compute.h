// What a worker computes on the shards it hosts:
// an expert shard's forward (x -> y, activations kept) and backward (dy ->
// dx, weight-gradient inputs kept), each over every trainer's rows of a
// micro-batch at once, and update (one GEMM over the step's contributions
// in (micro-batch, trainer rank) order, then the optimizer);
// a dense shard's pull (its parameters), push (one rank's gradient) and
// update (the pushes summed in rank order, then the optimizer). Order, not
// arrival, fixes every sum, so results do not depend on timing.
//
// Thread-compatible: the worker calls it under its state lock, from its
// compute thread (the GEMM libraries parallelise each product).
#ifndef SWITCHYARD_EXPERT_WORKER_SHARD_COMPUTE_H_
#define SWITCHYARD_EXPERT_WORKER_SHARD_COMPUTE_H_

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "common/buffer_pool.h"
#include "common/status.h"
#include "config.pb.h"
#include "expert_worker/expert_ffn.h"
#include "expert_worker/gemm.h"
#include "expert_worker/hosted_shard.h"
#include "expert_worker/optimizer.h"
#include "expert_worker/replica_client.h"
#include "expert_worker/replication.h"
#include "transport/data_plane.h"

namespace switchyard::expert_worker {

class ShardCompute {
 public:
  // `optimizer` and `pool` (request and gradient-input buffers) are not
  // owned and outlive this.
  ShardCompute(const config::SwitchyardConfig& config,
               const ExpertShape& shape0, const ExpertShape& shape, Gemm* gemm,
               const Optimizer* optimizer, BufferPool* pool);

  // One shard's requests of one (step, micro-batch, phase), gathered
  // (StepGate::Gather): every trainer's, in rank order, each with
  // payload (T_r, d_model) or none (no rows). They are computed as one
  // batch; outs[r] is request r's answer, (T_r, d_model) or empty.
  //
  // A forward (training: activations kept; requests[r] of
  // rank r), or an eval (nothing kept; any number of requests).
  //
  // With chunks on copies elsewhere (set_replicas) and `later` given, the
  // call returns once this worker's own chunks are computed, leaving in
  // *later what waits for the copies: the worker serves other requests
  // meanwhile and calls its finish(outs) once ready() (or when it has
  // nothing else to do). Until then the shard takes no other request of
  // the same step and micro-batch, and no update (its caller's duty: the
  // worker finishes everything before a StepDone or a routing change).
  // Without `later`, or with every chunk here, it waits itself.
  struct Unfinished {
    std::vector<std::shared_ptr<ReplicaClient::Pending>> waiting;
    std::function<Status(std::vector<Tensor>* outs)> finish;
    // Every copy has answered, or its deadline has passed: finish will
    // not wait.
    bool ready() const;
    // When the last of them gives up waiting.
    ReplicaClient::Deadline due() const;
  };
  Status Forward(const std::vector<const transport::Message*>& requests,
                 ExpertShard* shard, std::vector<Tensor>* outs,
                 std::optional<Unfinished>* later = nullptr) const;
  // The backward of a kept forward, payloads dy; outs: dx.
  Status Backward(const std::vector<const transport::Message*>& requests,
                  ExpertShard* shard, std::vector<Tensor>* outs,
                  std::optional<Unfinished>* later = nullptr) const;
  // Refuses a training forward or backward that this step already had, or
  // a backward without its forward, before it waits for the other ranks.
  static Status CheckNew(const transport::WireHeader& h,
                         const ExpertShard& shard);
  // An update is two phases, so that a worker applies a step to all of its
  // shards or to none: Gradients computes the shard's gradient from what
  // the step kept (the contributions since the last update; none: no
  // change) and checks that it is finite (FAILED_PRECONDITION naming the
  // shard and tensor otherwise); it drops forwards never followed by a
  // backward. Apply then runs the optimizer at `step` with that gradient.
  Status Gradients(ExpertShard* shard) const;
  Status Apply(int64_t step, ExpertShard* shard) const;
  // Whether the shard's gradient of the step in progress can be computed
  // before the step's StepDones: every micro-batch (training.micro_batches)
  // has had its backward, and none was computed yet.
  bool GradientsDue(const ExpertShard& shard) const;
  // Computes it then (the worker does, while idle), so that the last
  // StepDone waits only for what came last; Gradients adopts it. The same
  // GEMM over the same inputs, so the same bits.
  void EarlyGradients(ExpertShard* shard) const;
  // Hot-expert replication (nothing without it): counts step `step`'s
  // tokens (its gradient's, so Gradients must have run) into the shard's
  // window. At the end of a window (step + 1 a multiple of
  // replication.window_steps) decides the next window's replicas
  // (PlanReplicas) and opens a new window. For the step being applied, so
  // that a step refused or abandoned counts nowhere. Returns the plan's
  // replicas from the next step (1: none).
  int AdvancePlan(int64_t step, ExpertShard* shard) const;

  // A copy of the shard's parameters.
  static Tensor Pull(const DenseShard& shard) { return shard.params.Clone(); }
  // Keeps rank's gradient for the next update; refuses a second push of
  // the rank, a gradient not shaped like the parameters and a non-finite
  // one.
  static Status Push(const transport::WireHeader& h, const Tensor& grad,
                     DenseShard* shard);
  // The two phases (as for experts): the pushes' sum in rank order, then
  // the optimizer.
  Status Gradients(DenseShard* shard) const;
  Status Apply(int64_t step, DenseShard* shard) const;

  const ExpertFfn& ffn(int shard) const { return shard == 0 ? *ffn0_ : *ffn_; }

  // After the shard's update (its weights for `step`, the next step): a
  // shard whose chunks ran on copies in the step before and that has more
  // than one chunk in `step` sends its copies the new weights now
  // (ReplicaClient::PushAhead).
  void PushAhead(int64_t step, const ExpertShard& shard) const;

  // Where a replicated shard's chunks may run besides here (not owned;
  // null: every chunk here). Training chunks go to their copies (with
  // their expert-dropout multipliers); what a copy fails to do is computed
  // here, with the same bits.
  void set_replicas(ReplicaClient* replicas) { replicas_ = replicas; }

 private:
  // The gradient of the contributions kept (one GEMM in (micro-batch,
  // rank) order) into shard->grads, checked; *tokens: there were any.
  Status ComputeGradients(ExpertShard* shard, bool* tokens) const;
  // Runs `finish` now, or leaves it in *later when `later` is given and a
  // chunk in `sent` went to a copy.
  static Status Conclude(
      const std::vector<std::shared_ptr<ReplicaClient::Pending>>& sent,
      std::function<Status(std::vector<Tensor>*)> finish,
      std::vector<Tensor>* outs, std::optional<Unfinished>* later);

  const config::SwitchyardConfig& config_;
  const std::unique_ptr<ExpertFfn> ffn0_, ffn_;  // Shard 0 (has b2), others.
  // Chunk `r` of `c` (a contribution whose chunk ran on a copy) computed
  // here: its forward again (for h), then its backward into c's rows of a
  // and dh.
  Status RecomputeChunk(const ExpertShard& shard, RowRange r,
                        ExpertShard::Contribution* c) const;

  const Optimizer* const optimizer_;
  BufferPool* const pool_;
  ReplicaClient* replicas_ = nullptr;
};

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_SHARD_COMPUTE_H_
