// Placement: which live worker holds each expert shard and dense shard.
//
// Pure function of its input; deterministic (ties break by worker order, then
// shard id). Rules, in order:
//   1. Sticky: a shard stays on its previous worker while that worker is live
//      and has room.
//   2. Orphans (new shards, or shards of dead workers) go, largest first, to
//      the live worker with the fewest bytes (then fewest reported tokens)
//      that has room.
//   3. Joiners (live workers that held nothing while others held shards)
//      take shards from the fullest worker while a move narrows the gap
//      between the two, so a join moves shards only onto the new workers.
//   4. Capacity (parameters + gradients + optimizer state) is never exceeded;
//      shards that fit nowhere are reported with the shortfall.
#ifndef SWITCHYARD_COORDINATOR_PLACEMENT_H_
#define SWITCHYARD_COORDINATOR_PLACEMENT_H_

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/ids.h"
#include "common/model_shape.h"
#include "common/status.h"

namespace switchyard::coordinator {

struct WorkerSlot {
  std::string name;
  int64_t capacity_bytes = 0;
};

struct PlacementInput {
  std::vector<ShardFootprint> shards;
  // Live workers, in a deterministic order (the caller sorts by name).
  std::vector<WorkerSlot> workers;
  // Previous assignment: shard -> worker name (possibly of a dead worker).
  std::unordered_map<ShardId, std::string, ShardIdHash> previous;
  // Tokens per shard over the last reporting window (may be empty).
  std::unordered_map<ShardId, uint64_t, ShardIdHash> token_load;
};

struct PlacementResult {
  // Per input shard (same order): index into input.workers, or -1.
  std::vector<int> worker_of_shard;
  int num_unplaced = 0;
  // Shards whose worker differs from a previous, different worker.
  int num_moved = 0;
  // OK, or RESOURCE_EXHAUSTED naming the shortfall.
  Status status;
};

PlacementResult ComputePlacement(const PlacementInput& input);

// "1.5 GiB" style.
std::string FormatBytes(int64_t bytes);

}  // namespace switchyard::coordinator

#endif  // SWITCHYARD_COORDINATOR_PLACEMENT_H_
