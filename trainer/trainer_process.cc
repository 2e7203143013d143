#include "trainer/trainer_process.h"

#include <iostream>
#include <utility>

#include "common/config.h"
#include "common/metrics.h"
#include "common/mutex.h"
#include "common/thread_annotations.h"
#include "trainer/cluster_view.h"
#include "trainer/layers.h"
#include "transport/control/member_process.h"
#include "transport/data_plane.h"

namespace switchyard::trainer {

namespace {

// Failures the cluster may recover from under a new routing epoch (a
// member died, was fenced or replaced): stale epochs, abandoned steps,
// lost or silent peers. Others (a non-finite loss, a bad request, lost
// data) stop the trainer.
bool MayRecover(const Status& s) {
  switch (s.code()) {
    case StatusCode::kUnavailable:
    case StatusCode::kDeadlineExceeded:
    case StatusCode::kFailedPrecondition:
    case StatusCode::kAborted:
    case StatusCode::kNotFound:
    case StatusCode::kCancelled:  // FailPending: a new epoch arrived.
      return true;
    default:
      return false;
  }
}

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

  // Declared before the data plane, whose handler uses them.
  ClusterNews news;
  PeerLostReporter lost(&news);
  ASSIGN_OR_RETURN(auto data_plane,
                   transport::NewUcxDataPlane(
                       transport::DataPlaneOptionsFrom(config, secret)));
  data_plane->set_peer_lost_handler(
      [&lost](const std::string& address, const Status& why) {
        lost.Report(address, why);
      });
  lost.SetProbe(data_plane.get(),
                std::chrono::milliseconds(config.cluster().lease_ms()));
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
  // Set once before the body runs, on the same thread.
  std::shared_ptr<control::MemberSession> session;
  member.on_session = [&lost,
                       &session](std::shared_ptr<control::MemberSession> s) {
    session = s;
    lost.SetSession(std::move(s));
  };
  // The epoch training runs under (0: not started).
  std::atomic<uint64_t> training_epoch{0};
  member.on_routing = [&](const control::RoutingTable& routing) {
    int placed = 0;
    for (const auto& e : routing.entries()) placed += e.worker() >= 0;
    LOG(INFO) << name << ": routing epoch " << routing.epoch() << ": " << placed
              << "/" << routing.entries_size() << " shards reachable over "
              << routing.workers_size() << " workers";
    news.PublishRouting(routing, training_epoch.load(), data_plane.get());
  };
  // The epoch this trainer trains under, 0 while it waits for the cluster
  // (heartbeats tell the coordinator when a recovery is over).
  std::atomic<uint64_t> trains_at{0};
  // Stopped at the boundary before paused_step for a move.
  std::atomic<bool> paused{false};
  std::atomic<int64_t> paused_step{0};
  member.annotate_heartbeat = [&](control::Heartbeat* beat) {
    beat->set_training_epoch(trains_at.load());
    beat->set_step(replica.last_step());
    beat->set_paused(paused.load());
    beat->set_paused_step(paused_step.load());
  };
  member.on_heartbeat_ack = [&news](const control::HeartbeatAck& ack) {
    news.NoteAck(ack);
  };
  // How long to wait for every worker to join and every shard to be placed.
  const auto join_timeout =
      std::chrono::milliseconds(config.cluster().call_timeout_ms()) * 12;
  // Trains under `routing` from now on, and says so at once: the
  // coordinator waits for trainers that train under an epoch (a pause for
  // a move).
  auto train_under = [&](const control::RoutingTable& routing) {
    replica.SetRouting(routing);
    training_epoch = routing.epoch();
    trains_at = routing.epoch();
    if (session != nullptr) session->HeartbeatNow();
  };
  // Trains from step `from` to the run's end (under training_epoch, which a
  // live move may advance) and waits for the end's checkpoint to be
  // committed; OK when done, else why not (a failed step, or a rollback
  // before the commit).
  auto train_and_commit = [&](int64_t from,
                              const std::atomic<bool>& stopping) -> Status {
    auto result = RunTraining(config, corpus, options.training, {&replica},
                              from, &stopping, std::cout);
    if (!result.ok()) return result.status();
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
    // Done training: a move may pause at the end and go on from there.
    paused_step = end;
    paused = true;
    uint64_t epoch = training_epoch.load();
    while (news.committed < end && !stopping) {
      if (news.latest.epoch() > epoch) {
        // A hold, or an epoch that goes on from the end, changes nothing
        // here; anything else rolls back.
        if (!news.latest.hold() &&
            !(news.latest.continues() && news.latest.resume_step() == end)) {
          break;
        }
        if (!news.latest.hold()) {
          epoch = news.latest.epoch();
          train_under(news.latest);
        }
      }
      if (!news.changed.WaitUntil(&news.mu, deadline)) break;
    }
    paused = false;
    if (news.committed >= end) {
      if (options.rank == 0) {
        std::cout << "checkpoint " << end << " committed" << std::endl;
      }
      return OkStatus();
    }
    if (stopping) return OkStatus();
    if (news.latest.epoch() > epoch) {
      return AbortedError("the cluster moved to epoch " +
                          std::to_string(news.latest.epoch()) +
                          " before the checkpoint of step " +
                          std::to_string(end) + " was committed");
    }
    return DeadlineExceededError(
        "the checkpoint of step " + std::to_string(end) +
        " was not committed within " + std::to_string(commit_timeout.count()) +
        " ms (checkpoint.commit_timeout_ms; newest committed: " +
        std::to_string(news.committed) + ")");
  };
  // A live move (RoutingTable.pause): at the boundary before `step`, waits
  // there until the pause is lifted or moved on, or the epoch that moves
  // the shards continues from this step.
  const auto pause_limit =
      std::chrono::milliseconds(config.cluster().move_timeout_ms()) +
      join_timeout;
  auto boundary = [&](int64_t step,
                      const std::atomic<bool>& stopping) -> Status {
    MutexLock lock(&news.mu);
    const uint64_t epoch = training_epoch.load();
    const auto stops_here = [&] {
      news.mu.AssertHeld();
      return news.latest.epoch() == epoch && news.latest.pause() &&
             step >= news.latest.pause_step();
    };
    if (!stops_here()) return OkStatus();
    const auto began = std::chrono::steady_clock::now();
    paused_step = step;
    paused = true;
    if (session != nullptr) session->HeartbeatNow();
    LOG(INFO) << name << ": paused before step " << step
              << " for a move of shards (epoch " << epoch << ")";
    Status outcome;
    while (true) {
      if (stopping) {
        outcome = CancelledError("stopped while paused before step " +
                                 std::to_string(step));
        break;
      }
      if (news.latest.epoch() == epoch) {
        if (!stops_here()) break;  // Lifted, or on to a later boundary.
      } else if (!news.latest.hold() && AllShardsReachable(news.latest)) {
        if (!news.latest.continues() || news.latest.resume_step() != step) {
          outcome = AbortedError(
              "epoch " + std::to_string(news.latest.epoch()) +
              " resumes at step " + std::to_string(news.latest.resume_step()) +
              ", not at step " + std::to_string(step) +
              " where this trainer paused");
          break;
        }
        // Not paused before the new epoch is reported: no heartbeat says
        // "paused" under an epoch this trainer is about to train in.
        paused = false;
        train_under(news.latest);
        const double ms = std::chrono::duration<double, std::milli>(
                              std::chrono::steady_clock::now() - began)
                              .count();
        MetricsRegistry::Global()
            .GetHistogram("switchyard_trainer_move_pause_ms",
                          LatencyBucketsMs())
            ->Observe(ms);
        LOG(INFO) << name << ": epoch " << news.latest.epoch()
                  << " continues at step " << step << " after a pause of "
                  << static_cast<int64_t>(ms) << " ms (" << news.latest.cause()
                  << ")";
        break;
      }
      if (!news.changed.WaitUntil(&news.mu, began + pause_limit) &&
          std::chrono::steady_clock::now() >= began + pause_limit) {
        outcome = DeadlineExceededError(
            "paused before step " + std::to_string(step) +
            " for a move for more than " + std::to_string(pause_limit.count()) +
            " ms (cluster.move_timeout_ms + the join timeout)");
        break;
      }
    }
    paused = false;
    return outcome;
  };
  member.body = [&](const std::atomic<bool>& stopping) -> Status {
    replica.SetBoundary([&](int64_t step) { return boundary(step, stopping); });
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
    train_under(routing);
    int64_t from = routing.resume_step();
    int recoveries = 0;
    while (true) {
      Status failure = train_and_commit(from, stopping);
      if (failure.ok() || stopping) return OkStatus();
      if (!MayRecover(failure)) return failure;
      trains_at = 0;
      // The epoch trained under last (a live move may have advanced it).
      routing.set_epoch(training_epoch.load());
      // Recovery: the coordinator publishes a new epoch naming the step
      // every member continues from (a rollback to the newest committed
      // checkpoint, or after a hold the step the workers reached); this
      // trainer waits for it with every shard reachable.
      const auto failed_at = std::chrono::steady_clock::now();
      LOG(WARNING) << name << ": " << failure.ToString()
                   << "; waiting for the cluster to recover (a routing epoch "
                      "newer than "
                   << routing.epoch() << ")";
      {
        MutexLock lock(&news.mu);
        auto said = failed_at;
        while (!(news.latest.epoch() > routing.epoch() &&
                 AllShardsReachable(news.latest))) {
          if (stopping) return OkStatus();
          // A cluster that cannot hold the model says so in its table and
          // is waited for as long as the coordinator answers; otherwise a
          // recovery must come within join_timeout.
          const bool waiting_for_capacity =
              !news.latest.placement_error().empty();
          const auto deadline = waiting_for_capacity
                                    ? news.last_ack + join_timeout
                                    : failed_at + join_timeout;
          const auto now = std::chrono::steady_clock::now();
          if (waiting_for_capacity && now - said >= std::chrono::seconds(10)) {
            said = now;
            LOG(WARNING) << name << ": waiting for the cluster to hold the "
                         << "model again: " << news.latest.placement_error();
          }
          if (!news.changed.WaitUntil(
                  &news.mu,
                  std::min(deadline, now + std::chrono::seconds(1))) &&
              std::chrono::steady_clock::now() >= deadline) {
            return failure.WithContext(
                "no recovery within " + std::to_string(join_timeout.count()) +
                " ms" +
                (news.latest.placement_error().empty()
                     ? ""
                     : " (placement: " + news.latest.placement_error() + ")"));
          }
        }
        routing = news.latest;
      }
      train_under(routing);
      ++recoveries;
      const double waited_ms = std::chrono::duration<double, std::milli>(
                                   std::chrono::steady_clock::now() - failed_at)
                                   .count();
      auto& metrics = MetricsRegistry::Global();
      metrics.GetCounter("switchyard_trainer_recoveries_total")->Increment();
      metrics
          .GetHistogram("switchyard_trainer_recovery_ms", LatencyBucketsMs())
          ->Observe(waited_ms);
      metrics.GetCounter("switchyard_trainer_steps_redone_total")
          ->Increment(static_cast<uint64_t>(std::max<int64_t>(
              0, replica.last_step() - routing.resume_step())));
      LOG(WARNING) << name << ": recovery " << recoveries << ": epoch "
                   << routing.epoch() << " continues from step "
                   << routing.resume_step() << " (the failure was at step "
                   << replica.last_step() << ") after "
                   << static_cast<int64_t>(waited_ms) << " ms";
      from = routing.resume_step();
    }
  };
  Status s = control::RunMemberProcess(member);
  data_plane->Shutdown();
  return s;
}

}  // namespace switchyard::trainer
