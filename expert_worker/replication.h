// Hot-expert replication's plan and chunks (docs/replication.md).
//
// The primary of an expert shard splits the rows of each micro-batch into
// `replicas` fixed chunks (ChunkRows), and the weight gradient into one
// share per chunk, summed in chunk order. How many replicas a shard has is
// decided at the end of every replication.window_steps-th step from the
// shard's tokens over that window (PlanReplicas), and holds from the next
// step. Both are pure functions of the step's tokens, so the bits of a run
// depend on its data and configuration only.
#ifndef SWITCHYARD_EXPERT_WORKER_REPLICATION_H_
#define SWITCHYARD_EXPERT_WORKER_REPLICATION_H_

#include <cstdint>
#include <string>

#include "common/buffer_pool.h"
#include "common/status.h"
#include "common/tensor.h"
#include "config.pb.h"
#include "expert_worker/expert_ffn.h"

namespace switchyard::expert_worker {

// The mean expert shard's tokens per step: every trainer's tokens times
// model.top_k, spread over model.num_experts (a shard of an expert sees
// all of the expert's tokens).
double MeanExpertTokensPerStep(const config::SwitchyardConfig& config);

// The replicas of a shard for the next window, from its `current` replicas
// and its `tokens` over the window that ended, against `mean_tokens` (the
// mean expert shard's over a window): load = tokens / mean_tokens; a load of
// at least replication.hot_load, or a replicated shard's of at least
// replication.cool_load, gives ceil(load) replicas, at least 2 and at most
// replication.max_replicas; anything else gives 1.
int PlanReplicas(const config::ReplicationConfig& replication, int current,
                 int64_t tokens, double mean_tokens);

// Rows [begin, end) of chunk c when `rows` rows are cut into `chunks`:
// begin = rows * c / chunks (rounded down). Chunks differ by at most one
// row, and a chunk may be empty.
struct RowRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};
RowRange ChunkRows(int64_t rows, int chunks, int c);

// A shard's plan, as its checkpoint keeps it: tensor "repl", fp32 [3]:
// replicas, then the window's tokens as (tokens / 2^24, tokens mod 2^24),
// each an integer an fp32 holds exactly (tokens up to 2^48).
struct ReplicationState {
  int replicas = 1;
  int64_t window_tokens = 0;
};
// A new shard's: one replica, no tokens.
StatusOr<Tensor> NewReplicationTensor();
// DATA_LOSS naming `shard` when the tensor does not hold a plan (a shape
// other than [3], replicas outside [1, 64], tokens that are not
// non-negative integers below 2^48).
StatusOr<ReplicationState> ReadReplication(const Tensor& repl,
                                           const std::string& shard);
void WriteReplication(const ReplicationState& state, Tensor* repl);

// An expert shard's fp32 tensors (or their gradients) as one (1, n) fp32
// tensor, w1, b1, w2, b2 (those it has) one after another: what a primary
// sends its copies, and a copy its gradient share. In a buffer from `pool`
// when given (fresh memory costs a page fault per 4 KiB).
StatusOr<Tensor> FlattenParams(const ExpertParams& params,
                               BufferPool* pool = nullptr);
// Back into `params`' tensors (allocated, shaped as the sender's);
// INVALID_ARGUMENT when the sizes differ.
Status UnflattenParams(const Tensor& flat, ExpertParams* params);

// What a primary sends its copies each step: the shard's weights in the
// form its products multiply by (docs/replication.md, "Weights").
// - fp32 compute: FlattenParams's fp32 (1, n), w1, b1, w2, b2.
// - bf16 compute: bf16 (1, m): w1 and w2 in bf16 (the primary's own bf16
//   copies, or FloatToBf16 of w1 and w2 where it has none), then the fp32
//   bytes of b1 and b2, two bf16 elements a value. Half the bytes, and the
//   copy converts nothing and keeps no fp32 weights.
// In a buffer from `pool` when given.
StatusOr<Tensor> WeightsForCopies(const ExpertParams& params, DType compute,
                                  BufferPool* pool = nullptr);
// The element count of WeightsForCopies's tensor for a shard of `shape`
// (its dtype is shape.compute_dtype).
int64_t CopyWeightsElements(const ExpertShape& shape);
// INVALID_ARGUMENT unless `weights` is WeightsForCopies's form for a shard
// of `shape` (its dtype and element count).
Status CheckCopyWeights(const Tensor& weights, const ExpertShape& shape);
// Checked `weights` into a copy's `params`: ExpertParams::Zeros(shape,
// shape.compute_dtype)'s.
Status TakeWeights(const Tensor& weights, const ExpertShape& shape,
                   ExpertParams* params);

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_REPLICATION_H_
