// `switchyard worker`: an expert worker process.
//
// Joins the cluster, hosts the expert shards the routing table places on it
// (WorkerService), serves them over the UCX data plane on
// transport.data_host, advertises that address in its registration, and
// reports per-shard token counts with its heartbeats.
#ifndef SWITCHYARD_EXPERT_WORKER_WORKER_PROCESS_H_
#define SWITCHYARD_EXPERT_WORKER_WORKER_PROCESS_H_

#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"
#include "config.pb.h"
#include "control.pb.h"
#include "storage/checkpoint_store.h"

namespace switchyard::expert_worker {

struct WorkerOptions {
  std::string name;
  // Memory offered for shards; 0 means cluster.worker_capacity_bytes.
  int64_t capacity_bytes = 0;
  // cpu or cuda:N.
  std::string device = "cpu";
  // Advertised data-plane address; empty: the UCX listener's own.
  std::string data_address;
  // On SIGTERM/SIGINT, drain first (every shard handed to the other
  // workers live, within cluster.move_timeout_ms), then leave; without
  // it, or when the drain is refused, leave at once (the cluster recovers
  // the shards from the newest committed checkpoint).
  bool drain_on_stop = true;
};

// The shards `routing` places on worker `name`, as (count, bytes).
std::pair<int, int64_t> AssignedShards(const control::RoutingTable& routing,
                                       const std::string& name);

// Where worker `name` keeps its checkpoints: checkpoint.dir/<name>, or
// <cluster.state_dir>/checkpoints/<name> when checkpoint.dir is empty.
std::string CheckpointDir(const config::SwitchyardConfig& config,
                          const std::string& name);

// The worker's checkpoint store in `dir`. One whose files RocksDB finds
// damaged (DATA_LOSS, e.g. a corrupt table footer) is renamed, as it is, to
// `<dir>.damaged-<unix seconds>` and an empty store takes its place: the
// worker keeps running, and a resume fetches its shards from their other
// holders (checkpoint.replicas) or names the shards no copy is left of.
// Other errors are returned.
StatusOr<std::unique_ptr<storage::CheckpointStore>> OpenWorkerStore(
    const std::string& dir);

// Runs until SIGTERM/SIGINT (then drains, with drain_on_stop), or until
// the coordinator says it is drained (`switchyard drain`).
Status RunWorker(const config::SwitchyardConfig& config,
                 const std::string& secret, const WorkerOptions& options);

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_WORKER_PROCESS_H_
