#include "trainer/trainer_process.h"

#include <iostream>

#include "common/config.h"
#include "common/mutex.h"
#include "common/thread_annotations.h"
#include "trainer/layers.h"
#include "transport/control/member_process.h"
#include "transport/data_plane.h"

namespace switchyard::trainer {

namespace {

// All cluster.workers workers in the table, and every shard placed on one
// that has confirmed its address: the table training can start with.
bool ReadyToTrain(const control::RoutingTable& routing, int workers) {
  int confirmed = 0;
  for (const auto& w : routing.workers()) confirmed += w.confirmed();
  if (routing.entries_size() == 0 || confirmed < workers) return false;
  for (const auto& e : routing.entries()) {
    if (e.worker() < 0 || !routing.workers(e.worker()).confirmed()) {
      return false;
    }
  }
  return true;
}

// What the control thread hears of the cluster, for the training thread,
// which waits on `changed` for it.
struct ClusterNews {
  Mutex mu;
  CondVar changed;
  control::RoutingTable latest GUARDED_BY(mu);
  // The newest committed checkpoint, from heartbeat acknowledgements.
  int64_t committed GUARDED_BY(mu) = 0;
};

}  // namespace

StatusOr<ByteCorpus> LoadCorpus(const config::SwitchyardConfig& config) {
  const std::string& path = config.training().data_path();
  if (path.empty()) {
    return InvalidArgumentError(
        "no training data: set training.data_path (or pass --data PATH)");
  }
  return ByteCorpus::Load(path, config.training().validation_fraction(),
                          config.model().seq_len());
}

Status RunTrainer(const config::SwitchyardConfig& config,
                  const std::string& secret, const TrainerOptions& options) {
  if (options.rank < 0 || options.rank >= config.cluster().trainers()) {
    return InvalidArgumentError("--rank " + std::to_string(options.rank) +
                                " is outside [0, cluster.trainers = " +
                                std::to_string(config.cluster().trainers()) +
                                ")");
  }
  ASSIGN_OR_RETURN(ByteCorpus corpus, LoadCorpus(config));
  SetMatMulThreads(config.training().threads());

  ASSIGN_OR_RETURN(auto data_plane,
                   transport::NewUcxDataPlane(
                       transport::DataPlaneOptionsFrom(config, secret)));
  RETURN_IF_ERROR(data_plane->Start(transport::RefuseRequests("a trainer")));
  TrainerReplica replica(config, options.rank, data_plane.get());

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

  ClusterNews news;
  member.on_routing = [&](const control::RoutingTable& routing) {
    int placed = 0;
    for (const auto& e : routing.entries()) placed += e.worker() >= 0;
    LOG(INFO) << name << ": routing epoch " << routing.epoch() << ": " << placed
              << "/" << routing.entries_size() << " shards reachable over "
              << routing.workers_size() << " workers";
    MutexLock lock(&news.mu);
    news.latest = routing;
    news.changed.NotifyAll();
  };
  member.on_heartbeat_ack = [&](const control::HeartbeatAck& ack) {
    {
      // Under the lock: the waiter's check and its wait are one step.
      MutexLock lock(&news.mu);
      news.committed = ack.committed_step();
    }
    news.changed.NotifyAll();
  };
  // How long to wait for every worker to join and every shard to be placed.
  const auto join_timeout =
      std::chrono::milliseconds(config.cluster().call_timeout_ms()) * 12;
  member.body = [&](const std::atomic<bool>& stopping) -> Status {
    control::RoutingTable routing;
    {
      MutexLock lock(&news.mu);
      const auto deadline = std::chrono::steady_clock::now() + join_timeout;
      while (!ReadyToTrain(news.latest, config.cluster().workers())) {
        if (stopping) return OkStatus();
        if (!news.changed.WaitUntil(
                &news.mu,
                std::min(deadline, std::chrono::steady_clock::now() +
                                       std::chrono::milliseconds(200))) &&
            std::chrono::steady_clock::now() >= deadline) {
          return DeadlineExceededError(
              "no routing table placing every shard within " +
              std::to_string(join_timeout.count()) + " ms" +
              (news.latest.placement_error().empty()
                   ? " (are cluster.workers = " +
                         std::to_string(config.cluster().workers()) +
                         " workers running?)"
                   : ": " + news.latest.placement_error()));
        }
      }
      routing = news.latest;
    }
    replica.SetRouting(routing);
    auto result = RunTraining(config, corpus, options.training, {&replica},
                              routing.resume_step(), &stopping, std::cout);
    if (!result.ok()) {
      if (stopping) return OkStatus();  // Interrupted on purpose.
      return result.status();
    }
    LOG(INFO) << name << ": trained " << result->steps << " steps, "
              << static_cast<int64_t>(result->tokens_per_second) << " tokens/s";
    if (config.checkpoint().every() == 0) return OkStatus();
    // The run's end is only done once its checkpoint is committed: then
    // everything trained survives whatever happens next.
    const int64_t end = RunEndStep(config.training());
    const std::chrono::milliseconds commit_timeout(
        config.checkpoint().commit_timeout_ms());
    MutexLock lock(&news.mu);
    const auto deadline = std::chrono::steady_clock::now() + commit_timeout;
    while (news.committed < end && !stopping) {
      if (!news.changed.WaitUntil(&news.mu, deadline)) break;
    }
    if (news.committed < end && !stopping) {
      return DeadlineExceededError(
          "the checkpoint of step " + std::to_string(end) +
          " was not committed within " +
          std::to_string(commit_timeout.count()) +
          " ms (checkpoint.commit_timeout_ms; newest committed: " +
          std::to_string(news.committed) + ")");
    }
    if (options.rank == 0 && news.committed >= end) {
      std::cout << "checkpoint " << end << " committed" << std::endl;
    }
    return OkStatus();
  };
  Status s = control::RunMemberProcess(member);
  data_plane->Shutdown();
  return s;
}

}  // namespace switchyard::trainer
