// What adopting a routing table of a new epoch means for one worker,
// decided from the table, the worker's name, what it hosts and how far it
// has trained: the shards it is to host, which of them must be made, and
// whether they come from the checkpoint at the table's resume step or
// start from initial values. A pure function: WorkerService::ApplyRouting
// carries the plan out.
//
// Every new epoch names the step the whole cluster continues from (its
// resume step: the newest committed checkpoint, 0 for none; DESIGN.md,
// "Failures and elasticity"). A worker already there (a fresh start, or a
// resume before its first update) keeps what it hosts and makes only the
// shards new to it; a worker that has trained to another step rolls every
// shard it hosts back to the resume step.
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
  // Made shards whose old home hands their state over (a live move:
  // RoutingEntry.moved_from); neither restored nor initialised.
  std::set<ShardId> handover_experts;
  std::set<int> handover_dense;
  // The made shards not handed over are restored from the checkpoint at
  // the table's resume step (else they get initial values: a resume step
  // of 0).
  bool restore = false;
  // Every hosted shard is made again: the worker, which hosts shards,
  // rolls back.
  bool rolls_back = false;
};

RoutingPlan PlanRouting(const control::RoutingTable& routing,
                        const std::string& worker,
                        const std::set<ShardId>& hosted_experts,
                        const std::set<int>& hosted_dense, int64_t next_step);

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_ROUTING_PLAN_H_
