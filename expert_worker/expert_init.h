// Initial values of expert shards: the one definition shared by the workers
// and by single-process references.
//
// W1[i][g*d_ff + c] ~ N(0, init_scale / d_model) and
// W2[r][o] ~ N(0, init_scale / d_ff), each value a pure function of
// (seed, layer, expert, global row, global column): an expert's values do
// not depend on shards_per_expert or on which worker hosts it. Biases start
// at zero.
#ifndef SWITCHYARD_EXPERT_WORKER_EXPERT_INIT_H_
#define SWITCHYARD_EXPERT_WORKER_EXPERT_INIT_H_

#include "common/ids.h"
#include "common/status.h"
#include "config.pb.h"
#include "expert_worker/expert_ffn.h"

namespace switchyard::expert_worker {

// The shape of expert shard `shard` (shard 0 carries b2).
StatusOr<ExpertShape> ExpertShardShape(const config::SwitchyardConfig& config,
                                       int shard);

// Initial parameters of expert shard `id` (bf16 weight copies included when
// compute_dtype is bf16).
StatusOr<ExpertParams> InitialExpertParams(
    const config::SwitchyardConfig& config, const ShardId& id);

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_EXPERT_INIT_H_
