#include "expert_worker/worker_process.h"

#include <fcntl.h>
#include <glog/logging.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <system_error>

#include "common/mutex.h"
#include "common/thread_annotations.h"
#include "expert_worker/cuda/device_probe.h"
#include "expert_worker/worker_service.h"
#include "storage/checkpoint_store.h"
#include "transport/control/member_process.h"
#include "transport/data_plane.h"

namespace switchyard::expert_worker {

namespace {

// The member session once created (null before, and after the member
// process ends): the checkpoint writer's thread reports through it.
class SessionSlot {
 public:
  std::shared_ptr<control::MemberSession> Get() const EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    return session_;
  }
  void Set(std::shared_ptr<control::MemberSession> session) EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    session_ = std::move(session);
  }

 private:
  mutable Mutex mu_;
  std::shared_ptr<control::MemberSession> session_ GUARDED_BY(mu_);
};

}  // namespace

std::pair<int, int64_t> AssignedShards(const control::RoutingTable& routing,
                                       const std::string& name) {
  int self = -1;
  for (int i = 0; i < routing.workers_size(); ++i) {
    if (routing.workers(i).name() == name) self = i;
  }
  int count = 0;
  int64_t bytes = 0;
  for (const auto& entry : routing.entries()) {
    if (self >= 0 && entry.worker() == self) {
      ++count;
      bytes += entry.bytes();
    }
  }
  return {count, bytes};
}

namespace {

// Writes "<run id> <committed step>" to `path` durably: a temporary file,
// fsync, then rename over the old one.
Status WriteSeenFile(const std::string& path, const std::string& run_id,
                     int64_t committed_step) {
  const std::string tmp = path + ".tmp";
  const std::string text = run_id + " " + std::to_string(committed_step) + "\n";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) {
    return UnavailableError("cannot write " + tmp + ": " +
                            std::strerror(errno));
  }
  const bool written = ::write(fd, text.data(), text.size()) ==
                           static_cast<ssize_t>(text.size()) &&
                       ::fsync(fd) == 0;
  ::close(fd);
  if (!written || ::rename(tmp.c_str(), path.c_str()) != 0) {
    return UnavailableError("cannot write " + path + ": " +
                            std::strerror(errno));
  }
  return OkStatus();
}

}  // namespace

std::string CheckpointDir(const config::SwitchyardConfig& config,
                          const std::string& name) {
  const std::string& base = config.checkpoint().dir();
  return (base.empty() ? config.cluster().state_dir() + "/checkpoints" : base) +
         "/" + name;
}

StatusOr<std::unique_ptr<storage::CheckpointStore>> OpenWorkerStore(
    const std::string& dir) {
  const storage::CheckpointStoreOptions options;
  auto store = storage::OpenCheckpointStore(dir, options);
  if (store.ok() || store.status().code() != StatusCode::kDataLoss) {
    return store;
  }
  const std::string aside =
      dir + ".damaged-" +
      std::to_string(std::chrono::duration_cast<std::chrono::seconds>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count());
  std::error_code ec;
  std::filesystem::rename(dir, aside, ec);
  if (ec) {
    return store.status().WithContext("opening the checkpoint store " + dir +
                                      " (moving it aside to " + aside +
                                      " failed: " + ec.message() + ")");
  }
  LOG(ERROR) << "the checkpoint store " << dir << " cannot be opened ("
             << store.status().ToString() << "); moved it to " << aside
             << " as it is and started an empty store: a resume fetches "
                "this worker's shards from their other holders";
  return storage::OpenCheckpointStore(dir, options);
}

Status RunWorker(const config::SwitchyardConfig& config,
                 const std::string& secret, const WorkerOptions& options) {
  if (options.name.empty()) return InvalidArgumentError("--name is required");
  RETURN_IF_ERROR(CheckDevice(options.device));
  WorkerService service(config, options.name);
  // The session, once created: checkpoint reports go through it.
  SessionSlot session;
  if (config.checkpoint().every() > 0) {
    const std::string dir = CheckpointDir(config, options.name);
    ASSIGN_OR_RETURN(auto store, OpenWorkerStore(dir));
    LOG(INFO) << options.name << ": checkpoints every "
              << config.checkpoint().every() << " steps in " << dir;
    service.EnableCheckpoints(
        std::move(store),
        [&session, &service](const control::CheckpointReport& report) {
          std::shared_ptr<control::MemberSession> s = session.Get();
          if (s == nullptr) return UnavailableError("not in a cluster yet");
          auto ack = s->ReportCheckpoint(report);
          if (!ack.ok()) return ack.status();
          // Before the written copy is kept: which copies stay in memory.
          service.NoteCommitted(ack->newest_committed_step());
          return OkStatus();
        });
  }
  service.SetOnNews([&session] {
    if (std::shared_ptr<control::MemberSession> s = session.Get()) {
      s->HeartbeatNow();
    }
  });
  RETURN_IF_ERROR(service.Start());
  ASSIGN_OR_RETURN(auto data_plane,
                   transport::NewUcxDataPlane(
                       transport::DataPlaneOptionsFrom(config, secret)));
  service.SetPeerPlane(data_plane.get());
  RETURN_IF_ERROR(data_plane->Start(
      [&service](transport::Message request, transport::Reply reply) {
        service.Handle(std::move(request), std::move(reply));
      }));

  control::MemberProcessOptions member;
  member.config = config;
  member.secret = secret;
  auto& reg = member.registration;
  reg.set_kind(control::WORKER);
  reg.set_name(options.name);
  reg.set_capacity_bytes(options.capacity_bytes > 0
                             ? options.capacity_bytes
                             : config.cluster().worker_capacity_bytes());
  reg.set_device(options.device);
  reg.set_data_address(options.data_address.empty() ? data_plane->address()
                                                    : options.data_address);
  reg.set_rank(-1);
  const std::string name = options.name;
  member.on_routing = [name, &service](const control::RoutingTable& routing) {
    const auto [count, bytes] = AssignedShards(routing, name);
    LOG(INFO) << name << ": routing epoch " << routing.epoch() << ": holds "
              << count << " shards (" << bytes << " bytes)"
              << (routing.placement_error().empty()
                      ? ""
                      : "; placement error: " + routing.placement_error());
    // Applied on the worker's routing thread: making or restoring shards
    // must not hold up this control thread's heartbeats.
    service.OfferRouting(routing);
  };
  member.loads = [&service] { return service.TakeLoads(); };
  // A hold's report (where this worker stopped) goes with every heartbeat
  // until the next epoch, and at once when the hold begins.
  member.annotate_heartbeat = [&service](control::Heartbeat* beat) {
    beat->set_open_epoch(service.open_epoch());
    service.AnnotateReplication(beat);
    if (const auto held = service.held()) {
      beat->set_held_epoch(held->epoch);
      beat->set_held_step(held->step);
      beat->set_held_serving(held->serving);
    }
  };
  member.on_session = [&session](std::shared_ptr<control::MemberSession> s) {
    session.Set(std::move(s));
  };
  // What this worker heard of the run's commits, kept beside its
  // checkpoints: a restarted coordinator whose state lost commits is then
  // found out at this worker's next registration, even after a restart.
  const std::string seen_file =
      config.checkpoint().every() > 0
          ? CheckpointDir(config, options.name) + "/coordinator_seen"
          : "";
  if (!seen_file.empty()) {
    std::ifstream in(seen_file);
    std::string run_id;
    int64_t step = 0;
    if (in >> run_id >> step) {
      reg.set_run_id(run_id);
      reg.set_committed_step_seen(step);
    }
  }
  auto seen = std::make_shared<std::pair<std::string, int64_t>>(
      reg.run_id(), reg.committed_step_seen());
  // Set when the coordinator says this worker is drained.
  Mutex drained_mu;
  CondVar drained_cv;
  bool drained = false;
  member.on_heartbeat_ack = [&service, seen_file, seen, &drained_mu,
                             &drained_cv,
                             &drained](const control::HeartbeatAck& ack) {
    service.NoteMovesDone(ack.moves_done_epoch());
    if (ack.copy_hosts_size() > 0) {
      service.SetCopyHosts({ack.copy_hosts().begin(), ack.copy_hosts().end()});
    }
    if (ack.drained()) {
      MutexLock lock(&drained_mu);
      drained = true;
      drained_cv.NotifyAll();
    }
    if (!seen_file.empty() &&
        (ack.run_id() != seen->first || ack.committed_step() != seen->second)) {
      *seen = {ack.run_id(), ack.committed_step()};
      Status s = WriteSeenFile(seen_file, ack.run_id(), ack.committed_step());
      if (!s.ok()) LOG(WARNING) << s.ToString();
    }
    service.NoteCommitted(ack.committed_step());
    if (ack.keep_from_step() > 0) {
      service.DropCheckpointsBefore(ack.keep_from_step());
    }
    for (const auto& task : ack.replicate()) service.Replicate(task);
  };
  member.body = [&](const std::atomic<bool>& stopping) -> Status {
    // Serves until drained, or a signal; then, with drain_on_stop, drains.
    std::optional<std::chrono::steady_clock::time_point> drain_deadline;
    // A pause (move_timeout_ms), the moves (move_timeout_ms), and the
    // calls around them.
    const auto drain_time = std::chrono::milliseconds(
        2 * int64_t{config.cluster().move_timeout_ms()} +
        4 * int64_t{config.cluster().call_timeout_ms()});
    MutexLock lock(&drained_mu);
    while (true) {
      if (drained) {
        LOG(INFO) << name << ": drained: its shards are with the other workers";
        // A checkpoint being written is finished and reported first: the
        // commit of its step may wait for it.
        lock.Unlock();
        service.WaitCheckpointsWritten();
        return OkStatus();
      }
      if (stopping && !drain_deadline) {
        if (!options.drain_on_stop) return OkStatus();
        std::shared_ptr<control::MemberSession> s = session.Get();
        lock.Unlock();
        StatusOr<control::DrainResponse> r =
            s != nullptr ? s->Drain() : UnavailableError("no session");
        lock.Lock();
        if (!r.ok()) {
          LOG(ERROR) << name << ": cannot drain (" << r.status().ToString()
                     << "); leaving without handing its shards over (the "
                        "cluster recovers them from the newest committed "
                        "checkpoint)";
          return OkStatus();
        }
        LOG(INFO) << name << ": " << r->message();
        drain_deadline = std::chrono::steady_clock::now() + drain_time;
        if (s != nullptr) s->HeartbeatNow();
      }
      if (drain_deadline &&
          std::chrono::steady_clock::now() >= *drain_deadline) {
        // Leaving (the coordinator is told): the cluster recovers what this
        // worker still holds from the newest committed checkpoint.
        LOG(ERROR) << name << " was not drained within " << drain_time.count()
                   << " ms (2 x cluster.move_timeout_ms + 4 call timeouts); "
                      "leaving: the cluster recovers its shards from the "
                      "newest committed checkpoint";
        return OkStatus();
      }
      drained_cv.WaitUntil(&drained_mu, std::chrono::steady_clock::now() +
                                            std::chrono::milliseconds(50));
    }
  };
  Status result = control::RunMemberProcess(member);
  // Stop serving before the service goes away; the session is gone.
  session.Set(nullptr);
  data_plane->Shutdown();
  service.Shutdown();
  return result;
}

}  // namespace switchyard::expert_worker
