// What adopting a routing table means for one worker, decided from the
// table, the worker's name, what it hosts and how far it has trained: the
// shards it is to host, which of them must be made (new to it, or all of
// them when a resumed run reloads), and whether they come from the
// checkpoint at the table's resume step or start from initial values.
// A pure function: WorkerService::ApplyRouting carries the plan out.
//
// A resumed run restores before its first update: at start, and again when
// placement hands the worker more shards before training begins (the
// shards it has are then still exactly the checkpoint's, so only the new
// ones are loaded).
#ifndef SWITCHYARD_EXPERT_WORKER_ROUTING_PLAN_H_
#define SWITCHYARD_EXPERT_WORKER_ROUTING_PLAN_H_

#include <cstdint>
#include <set>
#include <string>

#include "common/ids.h"
#include "control.pb.h"

namespace switchyard::expert_worker {

struct RoutingPlan {
  std::set<ShardId> experts;       // Hosted after the table, expert shards.
  std::set<int> dense;             // And dense shards.
  std::set<ShardId> make_experts;  // To make (a subset of the above).
  std::set<int> make_dense;
  // The made shards are restored from the checkpoint at the table's
  // resume step (else they get initial values).
  bool restore = false;
  // New shards arrive mid-run without a restore: they start from initial
  // values (re-placement with a rollback belongs to recovery).
  bool adopts_mid_run = false;
};

RoutingPlan PlanRouting(const control::RoutingTable& routing,
                        const std::string& worker,
                        const std::set<ShardId>& hosted_experts,
                        const std::set<int>& hosted_dense, int64_t next_step);

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_ROUTING_PLAN_H_
