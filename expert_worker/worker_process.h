// `switchyard worker`: an expert worker process.
//
// For now it joins the cluster and follows its assignment (the shards the
// routing table places on it); expert compute and the data plane arrive with
// the data-plane work (docs/architecture.md).
#ifndef SWITCHYARD_EXPERT_WORKER_WORKER_PROCESS_H_
#define SWITCHYARD_EXPERT_WORKER_WORKER_PROCESS_H_

#include <cstdint>
#include <string>

#include "common/status.h"
#include "config.pb.h"
#include "control.pb.h"

namespace switchyard::expert_worker {

struct WorkerOptions {
  std::string name;
  // Memory offered for shards; 0 means cluster.worker_capacity_bytes.
  int64_t capacity_bytes = 0;
  // cpu or cuda:N.
  std::string device = "cpu";
  std::string data_address;
};

// The shards `routing` places on worker `name`, as (count, bytes).
std::pair<int, int64_t> AssignedShards(const control::RoutingTable& routing,
                                       const std::string& name);

// Runs until SIGTERM/SIGINT.
Status RunWorker(const config::SwitchyardConfig& config,
                 const std::string& secret, const WorkerOptions& options);

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_WORKER_PROCESS_H_
