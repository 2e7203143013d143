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
  const int64_t resume = routing.resume_step();
  plan.rolls_back =
      next_step != resume && (!hosted_experts.empty() || !hosted_dense.empty());
  // Shards moved live, by their old home.
  std::set<std::string> handed;
  if (routing.continues()) {
    for (const auto& e : routing.entries()) {
      if (self >= 0 && e.worker() == self && !e.moved_from().empty() &&
          e.moved_from() != worker) {
        handed.insert(FromShardRef(e.shard()).ToString());
      }
    }
  }
  bool restore = false;
  for (const ShardId& id : plan.experts) {
    if (plan.rolls_back || !hosted_experts.count(id)) {
      plan.make_experts.insert(id);
      if (handed.count(id.ToString()) && !plan.rolls_back) {
        plan.handover_experts.insert(id);
      } else {
        restore = true;
      }
    }
  }
  for (int index : plan.dense) {
    if (plan.rolls_back || !hosted_dense.count(index)) {
      plan.make_dense.insert(index);
      if (handed.count(ShardId::Dense(index).ToString()) && !plan.rolls_back) {
        plan.handover_dense.insert(index);
      } else {
        restore = true;
      }
    }
  }
  plan.restore = resume > 0 && restore;
  return plan;
}

}  // namespace switchyard::expert_worker
