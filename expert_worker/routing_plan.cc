#include "expert_worker/routing_plan.h"

#include "common/shard_ref.h"

namespace switchyard::expert_worker {

RoutingPlan PlanRouting(const control::RoutingTable& routing,
                        const std::string& worker,
                        const std::set<ShardId>& hosted_experts,
                        const std::set<int>& hosted_dense, int64_t next_step) {
  RoutingPlan plan;
  int self = -1;
  for (int i = 0; i < routing.workers_size(); ++i) {
    if (routing.workers(i).name() == worker) self = i;
  }
  for (const auto& e : routing.entries()) {
    if (self < 0 || e.worker() != self) continue;
    if (e.shard().kind() == control::EXPERT) {
      plan.experts.insert(FromShardRef(e.shard()));
    } else if (e.shard().kind() == control::DENSE) {
      plan.dense.insert(e.shard().shard());
    }
  }
  bool adopted = false;
  for (const ShardId& id : plan.experts) adopted |= !hosted_experts.count(id);
  for (int index : plan.dense) adopted |= !hosted_dense.count(index);
  const int64_t resume = routing.resume_step();
  plan.restore =
      resume > 0 && (next_step == 0 || (adopted && next_step == resume));
  plan.adopts_mid_run = adopted && next_step > 0 && !plan.restore;
  // A worker that has trained to another step reloads everything it hosts.
  const bool reload_all = plan.restore && next_step != resume;
  for (const ShardId& id : plan.experts) {
    if (reload_all || !hosted_experts.count(id)) plan.make_experts.insert(id);
  }
  for (int index : plan.dense) {
    if (reload_all || !hosted_dense.count(index)) plan.make_dense.insert(index);
  }
  return plan;
}

}  // namespace switchyard::expert_worker
