// The state of the shards a worker hosts: an expert shard (parameters,
// gradient buffers, optimizer state, and the step in progress's activations
// and weight-gradient inputs) and a dense-table shard (a flat slice of the
// DenseLayout concatenation with its optimizer state and the step's pushed
// gradients), and their checkpoint snapshots.
//
// Thread-compatible: the worker guards every hosted shard with its state
// lock.
#ifndef SWITCHYARD_EXPERT_WORKER_HOSTED_SHARD_H_
#define SWITCHYARD_EXPERT_WORKER_HOSTED_SHARD_H_

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "common/buffer_pool.h"
#include "common/ids.h"
#include "common/metrics.h"
#include "common/status.h"
#include "common/tensor.h"
#include "expert_worker/expert_ffn.h"
#include "expert_worker/optimizer.h"
#include "storage/checkpoint_store.h"

namespace switchyard::expert_worker {

struct ExpertShard {
  ShardId id;
  ExpertParams params;
  ExpertParams grads;
  OptimizerState w1, b1, w2, b2;
  // The step in progress's forwards, by (step, micro-batch): every
  // trainer's rows, concatenated in rank order.
  struct Activation {
    Tensor x, h;                // Empty when no trainer had rows.
    std::vector<int64_t> rows;  // Rows per rank.
    // Per chunk of a replicated shard: computed by its copy (whose host
    // keeps its rows of h; here they are not computed).
    std::vector<uint8_t> remote;
    // False while copies compute the forward's other chunks (it is not
    // answered yet): a backward of it is refused.
    bool answered = true;
  };
  std::map<std::pair<int64_t, int32_t>, Activation> activations;
  struct Contribution {
    Tensor x, a, dh, dy;  // a = act(h), from the backward pass; may be empty.
    // Per chunk: its backward ran on its copy, which keeps its rows of a
    // and dh (here they are not computed).
    std::vector<uint8_t> remote;
    // Expert dropout's keep multipliers of every row, kept only when a
    // chunk is remote (for computing it here again should its copy fail).
    std::vector<float> keep;
  };
  // Weight-gradient inputs of the step in progress, by micro-batch (each
  // with every rank's rows in rank order): std::map iterates them in
  // micro-batch order.
  std::map<int32_t, Contribution> contributions;
  // `grads` hold the step's gradient, computed and checked, not yet applied.
  bool grads_ready = false;
  // `grads` hold the gradient of the step in progress, computed before its
  // StepDones (every micro-batch's backward had come, and the worker was
  // idle); early_tokens: it had tokens; early_check: how computing and
  // checking it went. The step's update adopts it (ShardCompute).
  bool grads_early = false, early_tokens = false;
  Status early_check;
  // Hot-expert replication's plan (expert_worker/replication.h), when
  // replication.enabled: fp32 [3], checkpointed as "repl". Empty otherwise.
  Tensor repl;
  // The tokens of the step's gradient (every micro-batch's rows), counted
  // into the plan's window when the step is applied.
  int64_t step_tokens = 0;
  // The (epoch, step) of the step in progress's forwards: what its chunks
  // on copies are filed under.
  uint64_t chunk_epoch = 0;
  int64_t chunk_step = -1;
  // A chunk's share of the weight gradient, summed into `grads` in chunk
  // order (a replicated shard only).
  ExpertParams share;
  // switchyard_worker_expert_replicas{shard="<this shard>"}, once looked up.
  Gauge* replicas_gauge = nullptr;
};

struct DenseShard {
  int index = 0;
  Tensor params;  // (1, n)
  OptimizerState state;
  std::map<int32_t, Tensor> pushes;  // Gradients of the step, by rank.
  // The pushes' sum in rank order, checked, not yet applied (empty: none).
  Tensor grad;
};

// Drops what the step in flight left in `shard` (activations, gradient
// inputs, pushes, a computed but unapplied gradient): the step was
// abandoned (a new routing epoch).
void AbandonStep(ExpertShard* shard);
void AbandonStep(DenseShard* shard);

// `t` itself (shallow, sharing storage), or (deep) a copy in a buffer from
// `pool`: a checkpoint's staging copy reuses buffers instead of fresh
// memory, whose first touch costs 11.5 us per 4 KiB page on the CI VM.
Tensor CopyTensor(BufferPool& pool, const Tensor& t, bool deep);

// The shard's tensors as a checkpoint holds them, named as in
// docs/checkpoint_format.md ("w1", ..., "opt.w1.m", ...; dense: "params",
// "opt.m", ...). Step and epoch are left for the caller.
storage::ShardSnapshot SnapshotOf(const ExpertShard& shard, BufferPool& pool,
                                  bool deep);
storage::ShardSnapshot SnapshotOf(const DenseShard& shard, BufferPool& pool,
                                  bool deep);

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_HOSTED_SHARD_H_
