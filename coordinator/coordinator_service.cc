#include "coordinator/coordinator_service.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/net_address.h"
#include "transport/control/frame.h"

namespace switchyard::coordinator {

namespace asio = boost::asio;
using control::Envelope;

namespace {
constexpr char kSnapshotKey[] = "coordinator/snapshot";

std::string StateDir(const config::SwitchyardConfig& config) {
  return config.cluster().state_dir() + "/coordinator";
}
}  // namespace

StatusOr<std::unique_ptr<storage::KvStore>> OpenCoordinatorStore(
    const config::SwitchyardConfig& config) {
  return storage::OpenRocksKvStore(StateDir(config));
}

CoordinatorService::CoordinatorService(asio::io_context& io,
                                       config::SwitchyardConfig config,
                                       std::string secret,
                                       std::unique_ptr<storage::KvStore> store)
    : io_(io),
      config_(std::move(config)),
      secret_(std::move(secret)),
      tick_timer_(io),
      push_timer_(io),
      store_(std::move(store)) {
  CHECK(store_ != nullptr);
}

CoordinatorService::~CoordinatorService() = default;

Status CoordinatorService::CheckNoOrphanedCheckpoints() const {
  const std::string& base = config_.checkpoint().dir();
  const std::string stores =
      base.empty() ? config_.cluster().state_dir() + "/checkpoints" : base;
  std::string found;
  std::error_code ec;
  for (const auto& worker : std::filesystem::directory_iterator(stores, ec)) {
    std::error_code inner;
    for (const auto& file :
         std::filesystem::directory_iterator(worker.path() / "db", inner)) {
      if (file.path().extension() == ".sst") {
        found +=
            (found.empty() ? "" : ", ") + worker.path().filename().string();
        break;
      }
    }
  }
  if (found.empty()) return OkStatus();
  if (fresh_) {
    LOG(WARNING) << "coordinator: --fresh: a new run over the checkpoints of "
                 << found << " in " << stores
                 << " (the new run's checkpoints replace them)";
    return OkStatus();
  }
  return FailedPreconditionError(
      "no coordinator state in " + StateDir(config_) +
      ", but the checkpoint stores of " + found + " in " + stores +
      " hold checkpoints: this run's coordinator state was deleted or lost. "
      "Restore that directory to resume the run, or pass --fresh to start "
      "a new run over them");
}

uint16_t CoordinatorService::port() const {
  return server_ ? server_->port() : 0;
}

Status CoordinatorService::Start() {
  const std::string dir = StateDir(config_);
  uint64_t epoch = 0;
  {
    MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(auto existing, store_->Get(kSnapshotKey));
    if (existing) {
      control::CoordinatorSnapshot snapshot;
      if (!snapshot.ParseFromString(*existing)) {
        return DataLossError("coordinator snapshot in " + dir +
                             " does not parse");
      }
      ASSIGN_OR_RETURN(ClusterState restored,
                       ClusterState::Restore(config_, snapshot, Clock::now()));
      state_.emplace(std::move(restored));
    } else {
      RETURN_IF_ERROR(CheckNoOrphanedCheckpoints());
      state_.emplace(config_);
      LOG(INFO) << "coordinator: new run, state in " << dir;
    }
    RETURN_IF_ERROR(state_->ChooseResumeStep(fresh_, from_step_));
    if (state_->resume_step() > 0) {
      LOG(INFO) << "coordinator: training resumes from committed checkpoint "
                << state_->resume_step();
    }
    // Persist the (new or advanced) epoch before serving anyone.
    const std::string bytes = state_->Snapshot().SerializeAsString();
    RETURN_IF_ERROR(store_->Put(kSnapshotKey, bytes, /*sync=*/true));
    persisted_version_ = state_->version();
    pushed_routing_version_ = state_->routing_version();
    epoch = state_->epoch();
  }

  control::ControlOptions options;
  options.secret = secret_;
  options.max_frame_bytes = config_.cluster().max_frame_bytes();
  options.handshake_timeout =
      std::chrono::milliseconds(config_.cluster().call_timeout_ms());
  control::Connection::Handlers handlers;
  handlers.on_request = [this](const control::Connection::Ptr& conn,
                               Envelope request) {
    OnRequest(conn, std::move(request));
  };
  handlers.on_close = [this](const control::Connection::Ptr& conn,
                             const Status&) { OnClose(conn); };
  server_ = std::make_unique<control::ControlServer>(io_, options, handlers);
  ASSIGN_OR_RETURN(HostPort address,
                   ParseHostPort(config_.cluster().coordinator_address()));
  RETURN_IF_ERROR(server_->Listen(address));
  address.port = server_->port();

  // Publish the bound address atomically (write, then rename).
  const std::string addr_file =
      config_.cluster().state_dir() + "/coordinator.addr";
  {
    std::ofstream out(addr_file + ".tmp");
    out << address.ToString() << "\n";
    if (!out) return UnavailableError("cannot write " + addr_file + ".tmp");
  }
  std::error_code ec;
  std::filesystem::rename(addr_file + ".tmp", addr_file, ec);
  if (ec)
    return UnavailableError("cannot write " + addr_file + ": " + ec.message());
  LOG(INFO) << "coordinator: listening on " << address.ToString() << " (epoch "
            << epoch << ")";
  ScheduleTick();
  return OkStatus();
}

void CoordinatorService::FailLocked(const Status& why) {
  if (!failure_.ok()) return;
  failure_ = why;
  LOG(ERROR) << "coordinator: stopping: " << why.ToString();
  // After this request's reply is on its way.
  asio::post(io_, [this] {
    Shutdown();
    io_.stop();
  });
}

Status CoordinatorService::failure() const {
  MutexLock lock(&mu_);
  return failure_;
}

void CoordinatorService::Shutdown() {
  {
    MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
    connections_.clear();
  }
  asio::post(io_, [this] {
    tick_timer_.cancel();
    push_timer_.cancel();
  });
  if (server_) server_->Shutdown();
}

void CoordinatorService::ScheduleTick() {
  const int period_ms = std::max(10, config_.cluster().lease_ms() / 20);
  tick_timer_.expires_after(std::chrono::milliseconds(period_ms));
  tick_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;
    {
      MutexLock lock(&mu_);
      if (shut_down_) return;
      state_->Tick(Clock::now());
      CommitLocked().IgnoreError();  // Logged; retried on the next tick.
    }
    ScheduleTick();
  });
}

Status CoordinatorService::CommitLocked() {
  if (state_->version() != persisted_version_) {
    const std::string bytes = state_->Snapshot().SerializeAsString();
    Status s = store_->Put(kSnapshotKey, bytes, /*sync=*/true);
    if (!s.ok()) {
      // The state stays in memory and is retried on the next change or
      // tick; the routing table is not published until it is durable.
      LOG(ERROR) << "coordinator: cannot persist state: " << s.ToString();
      return s;
    }
    persisted_version_ = state_->version();
  }
  if (state_->routing_version() != pushed_routing_version_) PushLocked();
  return OkStatus();
}

void CoordinatorService::PushLocked() {
  // At most one table every kMinPushInterval: changes that come faster
  // (members confirming their addresses after a restart, one by one) go
  // out together.
  const auto now = std::chrono::steady_clock::now();
  if (now < last_push_ + kMinPushInterval) {
    if (push_scheduled_) return;
    push_scheduled_ = true;
    push_timer_.expires_at(last_push_ + kMinPushInterval);
    push_timer_.async_wait([this](const boost::system::error_code& ec) {
      if (ec) return;
      MutexLock lock(&mu_);
      push_scheduled_ = false;
      if (shut_down_ || !state_.has_value()) return;
      if (state_->routing_version() != pushed_routing_version_) PushLocked();
    });
    return;
  }
  last_push_ = now;
  pushed_routing_version_ = state_->routing_version();
  Envelope push;
  *push.mutable_routing_table() = state_->Routing();
  // Encoded once for every member.
  auto frame = std::make_shared<const std::string>(control::EncodeFrame(push));
  for (const auto& [name, conn] : connections_) conn->PushEncoded(frame);
}

void CoordinatorService::OnRequest(const control::Connection::Ptr& conn,
                                   Envelope request) {
  const uint64_t id = request.request_id();
  Envelope response;
  Status error;
  {
    MutexLock lock(&mu_);
    if (shut_down_) {
      conn->ReplyError(id, UnavailableError("coordinator shutting down"));
      return;
    }
    const auto now = Clock::now();
    switch (request.body_case()) {
      case Envelope::kRegisterRequest: {
        auto r = state_->Register(request.register_request(), now);
        if (r.ok()) {
          *response.mutable_register_response() = std::move(r).value();
          connections_[request.register_request().name()] = conn;
        } else {
          error = r.status();
          if (error.code() == StatusCode::kDataLoss) FailLocked(error);
        }
        break;
      }
      case Envelope::kHeartbeat: {
        auto r = state_->Heartbeat(request.heartbeat(), now);
        if (r.ok()) {
          *response.mutable_heartbeat_ack() = *r;
        } else {
          error = r.status();
        }
        break;
      }
      case Envelope::kLeave:
        error = state_->Leave(request.leave());
        if (error.ok()) {
          response.mutable_leave_ack();
          connections_.erase(request.leave().name());
        }
        break;
      case Envelope::kCheckpointReport: {
        auto r = state_->ReportCheckpoint(request.checkpoint_report());
        if (r.ok()) {
          *response.mutable_checkpoint_report_ack() = *r;
        } else {
          error = r.status();
        }
        break;
      }
      case Envelope::kPeerLost: {
        auto r = state_->PeerLost(request.peer_lost(), now);
        if (r.ok()) {
          *response.mutable_peer_lost_ack() = *r;
        } else {
          error = r.status();
        }
        break;
      }
      case Envelope::kDrainRequest: {
        auto r = state_->Drain(request.drain_request(), now);
        if (r.ok()) {
          *response.mutable_drain_response() = *r;
        } else {
          error = r.status();
        }
        break;
      }
      case Envelope::kStatusRequest:
        *response.mutable_status_response() = state_->Report(now);
        response.mutable_status_response()->set_coordinator_pid(::getpid());
        break;
      default:
        error = InvalidArgumentError("unexpected request (body case " +
                                     std::to_string(request.body_case()) +
                                     ") from " + conn->peer());
        LOG(WARNING) << "coordinator: " << error.message();
        break;
    }
    // Nothing is acknowledged before it is durable: a change the store
    // refused is answered UNAVAILABLE (members retry), not as done.
    const Status durable = CommitLocked();
    if (!durable.ok() && error.ok() &&
        request.body_case() != Envelope::kStatusRequest) {
      error = UnavailableError(
          "the coordinator cannot make its state durable (" +
          durable.ToString() + "); nothing was acknowledged: retry");
    }
  }
  if (error.ok()) {
    conn->Reply(id, std::move(response));
  } else {
    conn->ReplyError(id, error);
  }
}

void CoordinatorService::OnClose(const control::Connection::Ptr& conn) {
  MutexLock lock(&mu_);
  for (auto it = connections_.begin(); it != connections_.end();) {
    if (it->second == conn) {
      if (state_.has_value()) state_->ConnectionLost(it->first, Clock::now());
      it = connections_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace switchyard::coordinator
