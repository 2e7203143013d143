#include "trainer/moe_session.h"

#include <google/protobuf/util/message_differencer.h>

#include <chrono>
#include <cstdint>
#include <utility>

#include "common/finite.h"
#include "common/model_shape.h"
#include "transport/control/member_process.h"

namespace switchyard::trainer {

MoeSession::MoeSession(MoeSessionOptions options)
    : options_(std::move(options)) {}

MoeSession::~MoeSession() { (void)Close(); }

StatusOr<std::unique_ptr<MoeSession>> MoeSession::Connect(
    MoeSessionOptions options) {
  const int trainers = options.config.cluster().trainers();
  if (options.rank < 0 || options.rank >= trainers) {
    return InvalidArgumentError(
        "rank " + std::to_string(options.rank) +
        " is outside [0, cluster.trainers = " + std::to_string(trainers) + ")");
  }
  std::unique_ptr<MoeSession> session(new MoeSession(std::move(options)));
  RETURN_IF_ERROR(session->Start());
  return session;
}

Status MoeSession::Start() {
  const auto& config = options_.config;
  ASSIGN_OR_RETURN(data_plane_,
                   transport::NewUcxDataPlane(transport::DataPlaneOptionsFrom(
                       config, options_.secret)));
  data_plane_->set_peer_lost_handler(
      [this](const std::string& address, const Status& why) {
        lost_.Report(address, why);
      });
  lost_.SetProbe(data_plane_.get(),
                 std::chrono::milliseconds(config.cluster().lease_ms()));
  RETURN_IF_ERROR(data_plane_->Start(transport::RefuseRequests("a trainer")));
  client_ = std::make_unique<MoeLayerClient>(data_plane_.get(), config,
                                             options_.rank);

  control::MemberProcessOptions member;
  member.config = config;
  member.secret = options_.secret;
  member.handle_signals = false;  // The host program keeps its signals.
  auto& reg = member.registration;
  reg.set_kind(control::TRAINER);
  reg.set_name(options_.name.empty()
                   ? "trainer-" + std::to_string(options_.rank)
                   : options_.name);
  reg.set_rank(options_.rank);
  reg.set_device("cpu");
  member.on_session = [this](std::shared_ptr<control::MemberSession> s) {
    {
      MutexLock lock(&news_.mu);
      session_ = s;
    }
    lost_.SetSession(std::move(s));
  };
  member.on_routing = [this](const control::RoutingTable& routing) {
    news_.PublishRouting(routing, training_epoch_.load(), data_plane_.get());
  };
  member.annotate_heartbeat = [this](control::Heartbeat* beat) {
    beat->set_training_epoch(training_epoch_.load());
    beat->set_step(step_.load());
    // A session idle between steps while the table it holds asks for a
    // pause counts as stopped there: EnterStep, which sees the same table
    // (or a newer one), waits before anything of the step goes out.
    MutexLock lock(&news_.mu);
    const bool idle = idle_at_boundary_ && news_.latest.pause() &&
                      news_.latest.epoch() == training_epoch_ &&
                      step_ >= news_.latest.pause_step();
    beat->set_paused(paused_.load() || idle);
    beat->set_paused_step(step_.load());
  };
  member.on_registered = [this](const control::RegisterResponse& response) {
    std::string difference = ConfigDifference(response.config());
    MutexLock lock(&news_.mu);
    config_difference_ = std::move(difference);
    news_.changed.NotifyAll();
  };
  member.on_heartbeat_ack = [this](const control::HeartbeatAck& ack) {
    news_.NoteAck(ack);
  };
  // Registered: wait for a table to train with, then until Close.
  const auto join_timeout =
      std::chrono::milliseconds(config.cluster().call_timeout_ms()) * 12;
  member.body = [this, join_timeout, workers = config.cluster().workers()](
                    const std::atomic<bool>&) -> Status {
    MutexLock lock(&news_.mu);
    const auto deadline = std::chrono::steady_clock::now() + join_timeout;
    while (!ReadyToTrain(news_.latest, workers) && !closing_) {
      if (!news_.changed.WaitUntil(&news_.mu, deadline)) {
        return DeadlineExceededError(
            "no routing table placing every shard within " +
            std::to_string(join_timeout.count()) + " ms" +
            (news_.latest.placement_error().empty()
                 ? " (are cluster.workers = " + std::to_string(workers) +
                       " workers running?)"
                 : ": " + news_.latest.placement_error()));
      }
    }
    // A session of another configuration leaves cleanly (Start reports
    // why), not by lease expiry later.
    if (!config_difference_.empty()) return OkStatus();
    ready_routing_ = news_.latest;
    ready_ = true;
    news_.changed.NotifyAll();
    while (!closing_) news_.changed.Wait(&news_.mu);
    return OkStatus();
  };
  member_thread_ = std::thread([this, member = std::move(member)] {
    Status s = control::RunMemberProcess(member);
    MutexLock lock(&news_.mu);
    member_done_ = true;
    member_status_ = std::move(s);
    news_.changed.NotifyAll();
  });

  // Bounded: the body gives up after join_timeout, and RunMemberProcess
  // when registration fails for longer than call_timeout_ms x 6.
  control::RoutingTable routing;
  Status joined;
  {
    MutexLock lock(&news_.mu);
    while (!ready_ && !member_done_) news_.changed.Wait(&news_.mu);
    if (ready_) {
      routing = ready_routing_;
    } else if (!config_difference_.empty()) {
      joined = FailedPreconditionError(config_difference_);
    } else {
      joined = member_status_.ok()
                   ? UnavailableError("the member stopped before joining")
                   : member_status_;
    }
  }
  if (!joined.ok()) {
    (void)Close();
    return joined;
  }
  client_->SetRouting(routing);
  epoch_ = routing.epoch();
  resume_step_ = routing.resume_step();
  step_ = routing.resume_step();
  training_epoch_ = routing.epoch();
  {
    // The coordinator waits for trainers that train under an epoch (a
    // pause for a move): say so at once.
    MutexLock lock(&news_.mu);
    if (session_ != nullptr) session_->HeartbeatNow();
  }
  LOG(INFO) << "trainer " << options_.rank << ": training under routing epoch "
            << epoch_ << " from step " << step_.load();
  return OkStatus();
}

Status MoeSession::Close() {
  MutexLock calls(&call_mu_);
  {
    MutexLock lock(&news_.mu);
    closing_ = true;
    news_.changed.NotifyAll();
  }
  if (member_thread_.joinable()) member_thread_.join();
  if (data_plane_ != nullptr) data_plane_->Shutdown();
  MutexLock lock(&news_.mu);
  return member_status_;
}

Status MoeSession::CheckEpoch() {
  MutexLock lock(&news_.mu);
  if (member_done_) {
    return member_status_.ok()
               ? FailedPreconditionError("the session is closed")
               : member_status_.WithContext("the session left the cluster");
  }
  if (!config_difference_.empty()) {
    return FailedPreconditionError(config_difference_);
  }
  if (news_.latest.epoch() <= epoch_) return OkStatus();
  // Leave now: a session that stayed registered would be fenced by the
  // next one of its rank and come back as a new incarnation, fencing that
  // one in turn.
  closing_ = true;
  news_.changed.NotifyAll();
  return AbortedError(
      "the cluster moved to routing epoch " +
      std::to_string(news_.latest.epoch()) +
      (news_.latest.cause().empty() ? "" : " (" + news_.latest.cause() + ")") +
      (news_.latest.hold() ? ", holding"
                           : ", which resumes at step " +
                                 std::to_string(news_.latest.resume_step())) +
      "; step " + std::to_string(step_.load()) + " under epoch " +
      std::to_string(epoch_) +
      " is abandoned and this session has left the cluster (close it, "
      "restore the dense model to the resume step, connect again)");
}

Status MoeSession::EnterStep() {
  if (!at_boundary_) return CheckEpoch();
  const auto limit =
      std::chrono::milliseconds(options_.config.cluster().move_timeout_ms()) +
      std::chrono::milliseconds(options_.config.cluster().call_timeout_ms()) *
          12;
  const auto began = std::chrono::steady_clock::now();
  {
    MutexLock lock(&news_.mu);
    while (!member_done_ && !closing_ && config_difference_.empty()) {
      if (news_.latest.epoch() == epoch_) {
        if (!news_.latest.pause() || step_ < news_.latest.pause_step()) break;
        if (!paused_) {
          paused_ = true;
          LOG(INFO) << "trainer " << options_.rank << ": paused before step "
                    << step_.load() << " for a move of shards (epoch " << epoch_
                    << ")";
          if (session_ != nullptr) session_->HeartbeatNow();
        }
      } else if (!news_.latest.hold() && AllShardsReachable(news_.latest)) {
        if (news_.latest.continues() && news_.latest.resume_step() == step_) {
          client_->SetRouting(news_.latest);
          epoch_ = news_.latest.epoch();
          training_epoch_ = epoch_;
          if (session_ != nullptr) session_->HeartbeatNow();
          LOG(INFO) << "trainer " << options_.rank << ": epoch " << epoch_
                    << " continues at step " << step_.load() << " after "
                    << std::chrono::duration_cast<std::chrono::milliseconds>(
                           std::chrono::steady_clock::now() - began)
                           .count()
                    << " ms (" << news_.latest.cause() << ")";
        }
        break;  // Else CheckEpoch says why the step cannot go on.
      }
      if (!news_.changed.WaitUntil(&news_.mu, began + limit) &&
          std::chrono::steady_clock::now() >= began + limit) {
        break;
      }
    }
    // From here requests of step_ may go out: no longer idle (decided
    // under the lock the heartbeat's report is made under).
    idle_at_boundary_ = false;
  }
  paused_ = false;
  return CheckEpoch();
}

std::string MoeSession::ConfigDifference(
    const config::SwitchyardConfig& cluster) const {
  // What a trainer's requests depend on, from both configurations.
  auto relevant = [](const config::SwitchyardConfig& c) {
    config::SwitchyardConfig r;
    *r.mutable_model() = c.model();
    r.mutable_cluster()->set_trainers(c.cluster().trainers());
    r.mutable_training()->set_micro_batches(c.training().micro_batches());
    r.mutable_training()->set_eval_capacity_factor(
        c.training().eval_capacity_factor());
    r.mutable_training()->set_wire_dtype(c.training().wire_dtype());
    return r;
  };
  std::string report;
  google::protobuf::util::MessageDifferencer differencer;
  differencer.ReportDifferencesToString(&report);
  if (differencer.Compare(relevant(cluster), relevant(options_.config))) {
    return "";
  }
  return "this session's configuration differs from the cluster's (" +
         report.substr(0, report.find_last_not_of('\n') + 1) +
         "; the cluster's first): connect with the configuration and --set "
         "overrides given to `switchyard up`";
}

Status MoeSession::CheckCall(int layer, int micro_batch) const {
  const int layers = NumMoeLayers(options_.config.model());
  if (layer < 0 || layer >= layers) {
    return InvalidArgumentError("MoE layer " + std::to_string(layer) +
                                " is outside [0, " + std::to_string(layers) +
                                "): the cluster's model has " +
                                std::to_string(layers) + " MoE layers");
  }
  const int micro = options_.config.training().micro_batches();
  if (micro_batch < 0 || micro_batch >= micro) {
    return InvalidArgumentError("micro-batch " + std::to_string(micro_batch) +
                                " is outside [0, training.micro_batches = " +
                                std::to_string(micro) + ")");
  }
  return OkStatus();
}

Status MoeSession::CheckRoute(int layer, const Tensor& x,
                              const RouterState<float>& route) const {
  const auto& m = options_.config.model();
  RETURN_IF_ERROR(CheckCall(layer, 0));
  if (route.experts != m.num_experts() || route.k != m.top_k()) {
    return InvalidArgumentError(
        "a route over " + std::to_string(route.experts) + " experts, top-" +
        std::to_string(route.k) + ", for a cluster of model.num_experts = " +
        std::to_string(m.num_experts()) +
        ", model.top_k = " + std::to_string(m.top_k()));
  }
  const size_t n = static_cast<size_t>(route.tokens) * route.k;
  // The client indexes (token, choice) pairs with int.
  if (route.tokens < 0 || n > static_cast<size_t>(INT32_MAX / 2)) {
    return InvalidArgumentError(std::to_string(route.tokens) +
                                " tokens: too many for one call");
  }
  if (route.expert.size() != n || route.gate.size() != n ||
      route.kept.size() != n) {
    return InvalidArgumentError("route arrays do not hold tokens x k = " +
                                std::to_string(n) + " values");
  }
  for (size_t i = 0; i < n; ++i) {
    if (route.expert[i] < 0 || route.expert[i] >= route.experts) {
      return InvalidArgumentError(
          "token " + std::to_string(i / route.k) + " is routed to expert " +
          std::to_string(route.expert[i]) + ", outside [0, " +
          std::to_string(route.experts) + ")");
    }
  }
  if (x.dtype() != DType::kF32 || x.rank() != 2 || x.dim(0) != route.tokens ||
      x.dim(1) != m.d_model()) {
    return InvalidArgumentError(
        "MoE input " + x.DebugString() +
        " is not fp32 (tokens = " + std::to_string(route.tokens) +
        ", model.d_model = " + std::to_string(m.d_model()) + ")");
  }
  return OkStatus();
}

StatusOr<Tensor> MoeSession::Forward(int layer, int micro_batch,
                                     const Tensor& x,
                                     const RouterState<float>& route) {
  MutexLock calls(&call_mu_);
  RETURN_IF_ERROR(EnterStep());
  RETURN_IF_ERROR(CheckCall(layer, micro_batch));
  RETURN_IF_ERROR(CheckRoute(layer, x, route));
  at_boundary_ = false;
  return client_->Forward(step_, micro_batch, layer, x, route);
}

StatusOr<Tensor> MoeSession::Evaluate(int layer, const Tensor& x,
                                      const RouterState<float>& route) {
  MutexLock calls(&call_mu_);
  RETURN_IF_ERROR(EnterStep());
  RETURN_IF_ERROR(CheckRoute(layer, x, route));
  StatusOr<Tensor> y = client_->Evaluate(step_, layer, x, route);
  if (at_boundary_) {
    MutexLock lock(&news_.mu);
    idle_at_boundary_ = true;  // Evaluation starts no step.
  }
  return y;
}

Status MoeSession::Backward(int layer, int micro_batch, const Tensor& dy,
                            Tensor* dx, std::vector<float>* d_gate) {
  MutexLock calls(&call_mu_);
  RETURN_IF_ERROR(EnterStep());
  RETURN_IF_ERROR(CheckCall(layer, micro_batch));
  at_boundary_ = false;
  // A NaN or infinity would make every worker refuse the step's update and
  // stop the whole run (a loss scaler's overflow step, a loss spike).
  RETURN_IF_ERROR(CheckFinite(
      dy, "the output gradient of MoE layer " + std::to_string(layer) +
              " (skip step_done for this step, or lower the loss scale)"));
  return client_->Backward(step_, micro_batch, layer, dy, dx, d_gate);
}

Status MoeSession::StepDone() {
  MutexLock calls(&call_mu_);
  RETURN_IF_ERROR(EnterStep());
  at_boundary_ = false;
  RETURN_IF_ERROR(client_->StepDone(step_));
  ++step_;
  at_boundary_ = true;
  MutexLock lock(&news_.mu);
  idle_at_boundary_ = true;
  return OkStatus();
}

}  // namespace switchyard::trainer
