// `switchyard ckpt`: committed checkpoints read from a run directory,
// offline or next to a running cluster (read-only opens).
//
// The coordinator's state lists the committed checkpoints and which worker
// holds each shard; each worker's store is <checkpoint dir>/<worker name>
// (expert_worker::CheckpointDir).
#ifndef SWITCHYARD_CLI_CHECKPOINT_TOOLS_H_
#define SWITCHYARD_CLI_CHECKPOINT_TOOLS_H_

#include <ostream>
#include <string>

#include "common/status.h"
#include "config.pb.h"
#include "control.pb.h"
#include "coordinator_state.pb.h"

namespace switchyard::cli {

// The coordinator's durable state in <state_dir>/coordinator.
StatusOr<control::CoordinatorSnapshot> ReadCoordinatorState(
    const std::string& state_dir);

// The committed checkpoint at `step`, or the newest when step is 0.
StatusOr<control::CommittedCheckpoint> FindCommitted(
    const control::CoordinatorSnapshot& state, int64_t step);

// Prints one line per committed checkpoint.
void ListCheckpoints(const control::CoordinatorSnapshot& state,
                     std::ostream& out);

// Reads every shard of `commit` from its holder's store, checking every
// chunk, its manifest and the digest the coordinator committed. Prints a
// line per problem; fails (DATA_LOSS) when there is any.
Status VerifyCheckpoint(const config::SwitchyardConfig& config,
                        const control::CommittedCheckpoint& commit,
                        std::ostream& out);

// Writes the model's parameters at `commit` as safetensors into out_dir:
// dense.safetensors (every dense tensor under its DenseLayout name),
// experts-layer<L>.safetensors per MoE layer (layers.<L>.experts.<E>.w1,
// b1, w2, b2, an expert's shards joined along d_ff), and
// model.safetensors.index.json ({"metadata": {...}, "weight_map": {tensor:
// file}}). Matrices are stored as Switchyard computes with them, x @ W:
// w1 (d_model, g * d_ff) with SwiGLU's [gate | up], w2 (d_ff, d_model).
// config.json beside them describes the model (sizes, heads, activation,
// norm and eps, positions, router settings, tensor orientation: see
// docs/pytorch.md), as Hugging Face exports do.
Status ExportCheckpoint(const config::SwitchyardConfig& config,
                        const control::CommittedCheckpoint& commit,
                        const std::string& out_dir, std::ostream& out);

// Checks safetensors at `path` against `config`'s model for
// checkpoint.init_from and prints what a run would start from: dense
// tensors found, experts from their own tensors, upcycled from a dense FFN,
// or random. Fails naming a tensor whose shape does not fit.
Status DescribeImport(const config::SwitchyardConfig& config,
                      const std::string& path, std::ostream& out);

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_CHECKPOINT_TOOLS_H_
