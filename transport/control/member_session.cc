#include "transport/control/member_session.h"

namespace switchyard::control {

namespace asio = boost::asio;

MemberSession::Ptr MemberSession::Create(asio::io_context& io,
                                         MemberSessionOptions options,
                                         RoutingHandler on_routing) {
  return Ptr(new MemberSession(io, std::move(options), std::move(on_routing)));
}

MemberSession::MemberSession(asio::io_context& io, MemberSessionOptions options,
                             RoutingHandler on_routing)
    : io_(io),
      options_(std::move(options)),
      on_routing_(std::move(on_routing)),
      heartbeat_timer_(io) {
  // What a previous process of this member heard (a worker keeps it beside
  // its checkpoints).
  seen_run_id_ = options_.registration.run_id();
  seen_committed_step_ = options_.registration.committed_step_seen();
}

void MemberSession::Start() {
  std::weak_ptr<MemberSession> weak = shared_from_this();
  client_ = ControlClient::Create(
      io_, options_.client,
      [weak] {
        if (auto self = weak.lock()) {
          {
            MutexLock lock(&self->mu_);
            self->registered_ = false;
          }
          self->Register();
        }
      },
      [weak](Envelope push) {
        auto self = weak.lock();
        if (self && push.body_case() == Envelope::kRoutingTable) {
          self->DeliverRouting(push.routing_table());
        }
      });
  client_->Start();
  asio::post(io_, [self = shared_from_this()] { self->ScheduleHeartbeat(); });
}

void MemberSession::Register() {
  RegisterRequest request = options_.registration;
  {
    MutexLock lock(&mu_);
    if (stopped_ || registering_) return;
    registering_ = true;
    request.set_previous_incarnation(incarnation_);
    if (!seen_run_id_.empty()) {
      request.set_run_id(seen_run_id_);
      request.set_committed_step_seen(seen_committed_step_);
    }
  }
  Envelope envelope;
  *envelope.mutable_register_request() = request;
  client_->Call(std::move(envelope), options_.call_timeout,
                [self = shared_from_this()](StatusOr<Envelope> r) {
                  MutexLock lock(&self->mu_);
                  self->registering_ = false;
                  if (!r.ok()) {
                    self->last_error_ = r.status();
                    LOG(WARNING) << "member: registration failed: "
                                 << r.status().ToString();
                    return;  // The next heartbeat tick retries.
                  }
                  const RegisterResponse& resp = r->register_response();
                  if (self->incarnation_ != resp.incarnation()) {
                    LOG(INFO)
                        << "member: " << self->options_.registration.name()
                        << " registered as incarnation " << resp.incarnation();
                  }
                  self->incarnation_ = resp.incarnation();
                  if (resp.run_id() != self->seen_run_id_) {
                    self->seen_run_id_ = resp.run_id();
                    self->seen_committed_step_ = 0;
                  }
                  self->registered_ = true;
                  self->last_error_ = OkStatus();
                  lock.Unlock();
                  if (self->options_.on_registered) {
                    self->options_.on_registered(resp);
                  }
                  self->cv_.NotifyAll();
                  self->DeliverRouting(resp.routing());
                });
}

void MemberSession::ScheduleHeartbeat() {
  heartbeat_timer_.expires_after(options_.heartbeat_period);
  heartbeat_timer_.async_wait(
      [self = shared_from_this()](const boost::system::error_code& ec) {
        if (ec) return;
        self->SendHeartbeat();
        self->ScheduleHeartbeat();
      });
}

void MemberSession::HeartbeatNow() {
  asio::post(io_, [self = shared_from_this()] { self->SendHeartbeat(); });
}

void MemberSession::SendHeartbeat() {
  Heartbeat beat;
  bool registered;
  {
    MutexLock lock(&mu_);
    if (stopped_) return;
    registered = registered_;
    beat.set_name(options_.registration.name());
    beat.set_incarnation(incarnation_);
  }
  if (!registered) {
    Register();
    return;
  }
  if (options_.loads) {
    for (ShardLoad& load : options_.loads())
      *beat.add_loads() = std::move(load);
  }
  if (options_.annotate_heartbeat) options_.annotate_heartbeat(&beat);
  Envelope envelope;
  *envelope.mutable_heartbeat() = beat;
  client_->Call(std::move(envelope), options_.call_timeout,
                [self = shared_from_this()](StatusOr<Envelope> r) {
                  if (r.ok()) {
                    {
                      const HeartbeatAck& ack = r->heartbeat_ack();
                      MutexLock lock(&self->mu_);
                      if (ack.run_id() == self->seen_run_id_) {
                        self->seen_committed_step_ = ack.committed_step();
                      }
                    }
                    if (self->options_.on_heartbeat_ack) {
                      self->options_.on_heartbeat_ack(r->heartbeat_ack());
                    }
                    return;
                  }
                  if (r.status().code() != StatusCode::kFailedPrecondition) {
                    return;  // Connection trouble: the client reconnects.
                  }
                  LOG(WARNING) << "member: " << r.status().message();
                  {
                    MutexLock lock(&self->mu_);
                    self->registered_ = false;
                    self->incarnation_ = 0;  // Fenced: come back as a new one.
                  }
                  self->Register();
                });
}

void MemberSession::DeliverRouting(const RoutingTable& table) {
  {
    MutexLock lock(&mu_);
    if (table.epoch() < routing_.epoch()) return;
    routing_ = table;
  }
  if (on_routing_) on_routing_(table);
}

Status MemberSession::WaitRegistered(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  MutexLock lock(&mu_);
  while (!registered_) {
    if (!cv_.WaitUntil(&mu_, deadline)) break;
  }
  if (registered_) return OkStatus();
  return DeadlineExceededError("not registered within " +
                               std::to_string(timeout.count()) +
                               " ms: " + last_error_.ToString());
}

void MemberSession::Shutdown(bool leave) {
  Leave request;
  bool was_registered;
  {
    MutexLock lock(&mu_);
    if (stopped_) return;
    stopped_ = true;
    was_registered = registered_;
    request.set_name(options_.registration.name());
    request.set_incarnation(incarnation_);
  }
  if (leave && was_registered) {
    Envelope envelope;
    *envelope.mutable_leave() = request;
    auto r = client_->CallSync(std::move(envelope), options_.call_timeout);
    if (!r.ok() && r.status().code() == StatusCode::kUnavailable) {
      // The coordinator is gone already (`up` stops it first, so that its
      // saved placement is the whole cluster's): nothing to tell it.
      LOG(INFO) << "member: the coordinator is gone; left without telling it ("
                << r.status().message() << ")";
    } else if (!r.ok()) {
      LOG(WARNING) << "member: leave not acknowledged: "
                   << r.status().ToString();
    }
  }
  asio::post(io_,
             [self = shared_from_this()] { self->heartbeat_timer_.cancel(); });
  client_->Shutdown();
}

StatusOr<CheckpointReportAck> MemberSession::ReportCheckpoint(
    CheckpointReport report) {
  {
    MutexLock lock(&mu_);
    report.set_name(options_.registration.name());
    // A report that names the incarnation it was taken under keeps it: the
    // coordinator refuses it if that incarnation has been fenced since.
    if (report.incarnation() == 0) report.set_incarnation(incarnation_);
  }
  Envelope envelope;
  *envelope.mutable_checkpoint_report() = std::move(report);
  ASSIGN_OR_RETURN(Envelope r, client_->CallSync(std::move(envelope),
                                                 options_.call_timeout));
  return r.checkpoint_report_ack();
}

StatusOr<DrainResponse> MemberSession::Drain() {
  Envelope envelope;
  envelope.mutable_drain_request()->set_worker(options_.registration.name());
  ASSIGN_OR_RETURN(Envelope r, client_->CallSync(std::move(envelope),
                                                 options_.call_timeout));
  if (r.body_case() != Envelope::kDrainResponse) {
    return InternalError("the coordinator answered a drain request with body " +
                         std::to_string(r.body_case()));
  }
  return r.drain_response();
}

void MemberSession::ReportPeerLost(PeerLost report) {
  {
    MutexLock lock(&mu_);
    if (stopped_ || !registered_) return;
    report.set_reporter(options_.registration.name());
    report.set_incarnation(incarnation_);
  }
  const std::string peer = report.peer();
  Envelope envelope;
  *envelope.mutable_peer_lost() = std::move(report);
  client_->Call(
      std::move(envelope), options_.call_timeout, [peer](StatusOr<Envelope> r) {
        if (!r.ok()) {
          LOG(WARNING) << "member: telling the coordinator that " << peer
                       << " is unreachable failed: " << r.status().ToString();
        } else if (r->peer_lost_ack().fenced()) {
          LOG(WARNING) << "member: the coordinator fenced " << peer
                       << " (unreachable from here)";
        }
      });
}

uint64_t MemberSession::incarnation() const {
  MutexLock lock(&mu_);
  return incarnation_;
}

RoutingTable MemberSession::routing() const {
  MutexLock lock(&mu_);
  return routing_;
}

}  // namespace switchyard::control
