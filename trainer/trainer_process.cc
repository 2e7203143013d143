#include "trainer/trainer_process.h"

#include "transport/control/member_process.h"

namespace switchyard::trainer {

Status RunTrainer(const config::SwitchyardConfig& config,
                  const std::string& secret, const TrainerOptions& options) {
  if (options.rank < 0 || options.rank >= config.cluster().trainers()) {
    return InvalidArgumentError("--rank " + std::to_string(options.rank) +
                                " is outside [0, cluster.trainers = " +
                                std::to_string(config.cluster().trainers()) +
                                ")");
  }
  control::MemberProcessOptions member;
  member.config = config;
  member.secret = secret;
  auto& reg = member.registration;
  reg.set_kind(control::TRAINER);
  reg.set_name(options.name.empty() ? "trainer-" + std::to_string(options.rank)
                                    : options.name);
  reg.set_rank(options.rank);
  reg.set_device("cpu");
  const std::string name = reg.name();
  member.on_routing = [name](const control::RoutingTable& routing) {
    int placed = 0;
    for (const auto& e : routing.entries()) placed += e.worker() >= 0;
    LOG(INFO) << name << ": routing epoch " << routing.epoch() << ": " << placed
              << "/" << routing.entries_size() << " shards reachable over "
              << routing.workers_size() << " workers";
  };
  return control::RunMemberProcess(member);
}

}  // namespace switchyard::trainer
