// Makes the shards a worker comes to host, with their initial values: a
// pure function of (seed, layer, expert, global row, global column) for
// experts and of (seed, dense tensor, element) for dense tables, so that
// values do not depend on sharding or on which worker hosts a shard; or,
// with checkpoint.init_from, the tensors of a safetensors file (an expert's
// own, or the dense FFN it is upcycled from); or zero-filled, for shards
// about to be restored and for tensor shapes.
//
// Thread-safety: const methods only after Create; safe from any thread.
#ifndef SWITCHYARD_EXPERT_WORKER_SHARD_FACTORY_H_
#define SWITCHYARD_EXPERT_WORKER_SHARD_FACTORY_H_

#include <memory>
#include <optional>

#include "common/ids.h"
#include "common/status.h"
#include "config.pb.h"
#include "expert_worker/expert_ffn.h"
#include "expert_worker/hosted_shard.h"
#include "expert_worker/optimizer.h"
#include "storage/safetensors.h"

namespace switchyard::expert_worker {

class ShardFactory {
 public:
  // Opens checkpoint.init_from when set. `optimizer` (not owned) makes the
  // optimizer state and outlives the factory.
  static StatusOr<std::unique_ptr<ShardFactory>> Create(
      const config::SwitchyardConfig& config, const Optimizer* optimizer);

  // Initial values, or zeros when `initialise` is false.
  StatusOr<std::unique_ptr<ExpertShard>> NewExpert(const ShardId& id,
                                                   bool initialise) const;
  StatusOr<std::unique_ptr<DenseShard>> NewDense(int index,
                                                 bool initialise) const;

  // Expert shard shape of shard 0 (with b2) or of the others.
  const ExpertShape& shape(int shard) const {
    return shard == 0 ? shape0_ : shape_;
  }

 private:
  ShardFactory(const config::SwitchyardConfig& config,
               const Optimizer* optimizer)
      : config_(config), optimizer_(optimizer) {}
  Status InitExpertFrom(const ShardId& id, ExpertParams* params) const;
  Status InitDenseFrom(int index, Tensor* params) const;

  const config::SwitchyardConfig config_;
  const Optimizer* const optimizer_;
  ExpertShape shape0_, shape_;
  std::optional<storage::SafetensorsReader> init_;  // checkpoint.init_from.
};

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_SHARD_FACTORY_H_
