// DataPlane on UCX active messages (docs/protocol.md, "Data plane"): the
// composition of its parts, and the request/response protocol between them.
//
// One UCP context and worker per data plane, driven by a ProgressDriver
// (progress_driver.h: the progress thread, or a thread waiting in
// SendAndWait, holds the role and alone calls UCX; other threads post
// commands to it). Messages travel as active messages framed by AmCodec
// (am_codec.h); connections are an EndpointTable's (endpoint_table.h),
// with peer error handling: a lost peer fails every request pending on it.
// Requests awaiting answers, with their deadlines, are a PendingRequests
// (pending_requests.h). A server holds at most max_inflight_bytes of
// received, unanswered requests (and as much again of own_budget_kinds):
// further rendezvous payloads stay with their senders until bytes drain
// (backpressure). Processes of one host
// use shared memory and CMA (see NewUcxDataPlane).
//
// Thread-safety: as DataPlane. Everything below the public methods runs on
// the role holder.
#include <ucp/api/ucp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>

#include "common/metrics.h"
#include "transport/data_plane.h"
#include "transport/ucx/am_codec.h"
#include "transport/ucx/endpoint_table.h"
#include "transport/ucx/pending_requests.h"
#include "transport/ucx/progress_driver.h"
#include "transport/ucx/ucx_status.h"

namespace switchyard::transport {
namespace {

using Clock = std::chrono::steady_clock;

class UcxDataPlane : public DataPlane {
 public:
  explicit UcxDataPlane(DataPlaneOptions options);
  ~UcxDataPlane() override { Shutdown(); }

  Status Start(RequestHandler handler) override;
  void Shutdown() override;
  std::string address() const override { return address_; }
  void FailPending(const Status& why) override;
  void Send(const std::string& peer, Message request,
            std::chrono::milliseconds timeout, ResponseCallback done) override;
  bool SendAndWait(std::vector<SendRequest> requests, Mutex* mu, CondVar* cv,
                   Clock::time_point deadline,
                   const std::function<bool()>& done) override REQUIRES(mu);
  void Connect(const std::string& peer) override {
    driver_.Post([this, peer] {
      if (!driver_.stopping()) (void)endpoints_.Connect(peer);
    });
  }
  std::string ConnectionInfo(const std::string& peer) const override {
    return endpoints_.ConnectionInfo(peer);
  }

 private:
  // A request whose rendezvous payload waits for in-flight bytes to drain.
  struct Deferred {
    WireHeader header;
    void* desc;
    ucp_ep_h reply_ep;
  };

  // Sends a request to `peer`: Send's work.
  void StartRequest(const std::string& peer, Message request,
                    Clock::time_point deadline, ResponseCallback done);
  // EndpointTable: `ep` is gone; its requests fail.
  void PeerLost(ucp_ep_h ep, const std::string& peer, const Status& why);
  // AmCodec: the request `request_id` could not be sent.
  void SendFailed(uint64_t request_id, ucs_status_t status);
  // Answers `request` with `error` over `ep` (when it is still up).
  void ReplyTo(ucp_ep_h ep, const WireHeader& request, const Status& error);
  ucs_status_t OnRequest(const IncomingAm& in);
  ucs_status_t OnResponse(const IncomingAm& in);
  // Receives a request's rendezvous payload, then dispatches it.
  void StartReceive(const WireHeader& header, void* desc, ucp_ep_h reply_ep);
  // Hands a received request to the handler, with the Reply that answers
  // it (once).
  void Dispatch(WireHeader header, Tensor payload, ucp_ep_h reply_ep);
  // Starts the deferred receives that the in-flight budget now allows.
  void PumpDeferred();
  // ProgressDriver::Hooks::has_work.
  bool HasWork() const;
  // Fails what is pending and releases every UCX resource.
  void ReleaseUcx();

  const DataPlaneOptions options_;
  Counter* const metrics_requests_;
  Counter* const metrics_errors_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::string address_;
  RequestHandler handler_;
  std::once_flag shutdown_once_;

  // The role holder's alone (no lock: see ProgressDriver).
  PendingRequests pending_;
  // Per budget (0: most kinds; 1: options_.own_budget_kinds): bytes of
  // received requests not yet answered, and the receives waiting for room.
  int BudgetOf(const WireHeader& h) const {
    return options_.own_budget_kinds.count(h.kind) > 0 ? 1 : 0;
  }
  size_t inflight_bytes_[2] = {0, 0};
  std::deque<Deferred> deferred_[2];
  AmCodec codec_;
  EndpointTable endpoints_;
  // Last: destroyed first.
  ProgressDriver driver_;
};

UcxDataPlane::UcxDataPlane(DataPlaneOptions options)
    : options_(std::move(options)),
      metrics_requests_(MetricsRegistry::Global().GetCounter(
          "switchyard_data_plane_requests_total")),
      metrics_errors_(MetricsRegistry::Global().GetCounter(
          "switchyard_data_plane_rejected_total")),
      codec_(
          options_.rendezvous_threshold_bytes, options_.pool_cached_bytes,
          {.on_request = [this](const IncomingAm& in) { return OnRequest(in); },
           .on_response =
               [this](const IncomingAm& in) { return OnResponse(in); },
           .on_send_failed = [this](uint64_t id,
                                    ucs_status_t s) { SendFailed(id, s); }}),
      endpoints_(
          options_.secret, options_.handshake_timeout,
          {.post =
               [this](std::function<void()> fn) {
                 return driver_.Post(std::move(fn));
               },
           .lost = [this](ucp_ep_h ep, const std::string& peer,
                          const Status& why) { PeerLost(ep, peer, why); }}),
      driver_(options_.busy_poll_us, options_.max_busy_poll_us,
              {.expire =
                   [this](Clock::time_point now) {
                     const bool handshakes = endpoints_.ExpireHandshakes(now);
                     std::vector<std::string> silent;
                     const bool expired = pending_.ExpireDue(now, &silent) > 0;
                     for (const std::string& peer : silent) {
                       NotifyPeerLost(peer, DeadlineExceededError(
                                                "no data-plane response from " +
                                                peer + " by the deadline"));
                     }
                     return expired || handshakes;
                   },
               .next_deadline =
                   [this] {
                     return std::min(pending_.NextDeadline(),
                                     endpoints_.NextHandshakeDeadline());
                   },
               .has_work = [this] { return HasWork(); },
               .stopped = [this] { ReleaseUcx(); }}) {}

Status UcxDataPlane::Start(RequestHandler handler) {
  handler_ = std::move(handler);
  const std::string& tls = options_.ucx_tls;
  if (!tls.empty() && tls.find("tcp") == std::string::npos &&
      tls.find("all") == std::string::npos) {
    return InvalidArgumentError(
        "transport.ucx_tls '" + tls +
        "' has no tcp: UCX 1.13 sets up client-server connections over TCP; "
        "add tcp (shared memory is still used between local processes)");
  }
  ucp_config_t* config = nullptr;
  RETURN_IF_ERROR(UCX_STATUS(ucp_config_read(nullptr, nullptr, &config),
                             "ucp_config_read"));
  if (!options_.ucx_tls.empty()) {
    ucs_status_t s = ucp_config_modify(config, "TLS", options_.ucx_tls.c_str());
    if (s != UCS_OK) {
      ucp_config_release(config);
      return UCX_STATUS(s, "UCX_TLS=" + options_.ucx_tls);
    }
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  ucs_status_t s = ucp_init(&params, config, &context_);
  ucp_config_release(config);
  RETURN_IF_ERROR(UCX_STATUS(s, "ucp_init"));

  ucp_worker_params_t wparams{};
  wparams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wparams.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  RETURN_IF_ERROR(UCX_STATUS(ucp_worker_create(context_, &wparams, &worker_),
                             "ucp_worker_create"));
  int efd = -1;
  RETURN_IF_ERROR(
      UCX_STATUS(ucp_worker_get_efd(worker_, &efd), "ucp_worker_get_efd"));
  RETURN_IF_ERROR(codec_.Register(worker_));
  RETURN_IF_ERROR(endpoints_.Listen(worker_, options_.listen_host, &address_));
  driver_.Start(worker_, efd);
  LOG(INFO) << "data plane: UCX listening on " << address_;
  return OkStatus();
}

void UcxDataPlane::Shutdown() {
  std::call_once(shutdown_once_, [this] {
    // A driver that ran released UCX on its thread (Hooks::stopped).
    if (!driver_.Stop()) ReleaseUcx();
  });
}

void UcxDataPlane::ReleaseUcx() {
  pending_.FailAll(CancelledError("data plane shutting down"));
  for (auto& deferred : deferred_) {
    for (const Deferred& d : deferred) codec_.Release(d.desc);
    deferred.clear();
  }
  endpoints_.Close();
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  if (context_ != nullptr) ucp_cleanup(context_);
  worker_ = nullptr;
  context_ = nullptr;
}

bool UcxDataPlane::HasWork() const {
  return pending_.size() > 0 || !deferred_[0].empty() ||
         !deferred_[1].empty() || inflight_bytes_[0] > 0 ||
         inflight_bytes_[1] > 0 ||
         endpoints_.HasServerSide();  // A peer that sends us requests.
}

void UcxDataPlane::FailPending(const Status& why) {
  // On the driver, in order with the sends posted before and after it.
  driver_.Post([this, why] { pending_.FailAll(why); });
}

void UcxDataPlane::Send(const std::string& peer, Message request,
                        std::chrono::milliseconds timeout,
                        ResponseCallback done) {
  const auto deadline = Clock::now() + timeout;
  auto shared_done = std::make_shared<ResponseCallback>(std::move(done));
  const bool posted = driver_.Post([this, peer, request = std::move(request),
                                    deadline, shared_done]() mutable {
    StartRequest(peer, std::move(request), deadline, std::move(*shared_done));
  });
  if (!posted) {
    (*shared_done)(
        CancelledError("data plane is not running (not started, "
                       "or shut down)"));
  }
}

bool UcxDataPlane::SendAndWait(std::vector<SendRequest> requests, Mutex* mu,
                               CondVar* cv, Clock::time_point deadline,
                               const std::function<bool()>& done) {
  const std::optional<bool> finished = driver_.WaitDriving(
      [&](bool holding_role) {
        if (holding_role) {
          const auto now = Clock::now();
          for (SendRequest& r : requests) {
            StartRequest(r.peer, std::move(r.message), now + r.timeout,
                         std::move(r.done));
          }
        } else {
          for (SendRequest& r : requests) {
            Send(r.peer, std::move(r.message), r.timeout, std::move(r.done));
          }
        }
      },
      mu, cv, deadline, done);
  if (finished.has_value()) return *finished;
  // Not started, or shut down: every Send fails at once.
  return DataPlane::SendAndWait(std::move(requests), mu, cv, deadline, done);
}

void UcxDataPlane::StartRequest(const std::string& peer, Message request,
                                Clock::time_point deadline,
                                ResponseCallback done) {
  if (driver_.stopping()) {
    done(CancelledError("data plane shutting down"));
    return;
  }
  StatusOr<ucp_ep_h> ep = endpoints_.Connect(peer);
  if (!ep.ok()) {
    done(UnavailableError(ep.status().message()));
    return;
  }
  const uint64_t id = pending_.Add(std::move(done), deadline, *ep, peer,
                                   std::move(request.receive_into));
  request.receive_into = Tensor();
  request.header.request_id = id;
  request.header.status_code = 0;
  switch (endpoints_.state(*ep)) {
    case EndpointTable::State::kGone:  // Its wire-up failed at once.
      pending_.Complete(
          id, UnavailableError("cannot connect to data plane at " + peer));
      return;
    case EndpointTable::State::kReady:
      codec_.Send(*ep, kRequestAm, std::move(request), id);
      return;
    case EndpointTable::State::kConnecting:
      endpoints_.Park(
          *ep, [this, ep = *ep, id, request = std::move(request)]() mutable {
            if (pending_.Find(id) == nullptr) return;  // Expired while parked.
            codec_.Send(ep, kRequestAm, std::move(request), id);
          });
      return;
  }
}

void UcxDataPlane::PeerLost(ucp_ep_h ep, const std::string& peer,
                            const Status& why) {
  const std::vector<uint64_t> failed = pending_.IdsOn(ep);
  // A peer that goes away with nothing pending is ordinary (a trainer or
  // test client shutting down); one that takes requests with it is not.
  if (failed.empty()) {
    VLOG(1) << "data plane: connection with " << peer
            << " closed: " << why.ToString();
  } else {
    LOG(WARNING) << "data plane: connection with " << peer << " lost with "
                 << failed.size() << " requests pending: " << why.ToString();
  }
  // A failed handshake keeps its code: retrying cannot help.
  const StatusCode code = why.code() == StatusCode::kUnauthenticated
                              ? StatusCode::kUnauthenticated
                              : StatusCode::kUnavailable;
  for (uint64_t id : failed) {
    pending_.Complete(id, Status(code, "data-plane peer " + peer +
                                           " lost: " + why.message()));
  }
  if (!failed.empty()) NotifyPeerLost(peer, why);
}

void UcxDataPlane::SendFailed(uint64_t request_id, ucs_status_t status) {
  const std::string* peer = pending_.Find(request_id);
  if (peer == nullptr) return;
  pending_.Complete(request_id,
                    UCX_STATUS(status, "send to data plane at " + *peer));
}

void UcxDataPlane::ReplyTo(ucp_ep_h ep, const WireHeader& request,
                           const Status& error) {
  metrics_errors_->Increment();
  if (ep == nullptr || endpoints_.state(ep) == EndpointTable::State::kGone) {
    return;
  }
  codec_.Send(ep, kResponseAm, ErrorResponse(request, error), 0);
}

ucs_status_t UcxDataPlane::OnRequest(const IncomingAm& in) {
  metrics_requests_->Increment();
  if (!endpoints_.Authenticated(in.reply_ep)) {
    // Nothing is answered, nothing read: a rendezvous payload stays unread.
    metrics_errors_->Increment();
    endpoints_.Refuse(in.reply_ep, "a request before authenticating");
    return UCS_OK;
  }
  if (!in.header_complete()) {
    LOG(WARNING) << "data plane: dropping a request from "
                 << endpoints_.PeerOf(in.reply_ep) << " with a "
                 << in.header_length << "-byte header (expected "
                 << sizeof(WireHeader) << ")";
    metrics_errors_->Increment();
    return UCS_OK;  // Nothing to answer to: the request id is unknown.
  }
  Status valid = ValidateHeader(in.header, in.header_length, in.length,
                                options_.max_payload_bytes);
  if (!valid.ok()) {
    LOG(WARNING) << "data plane: refusing a request from "
                 << endpoints_.PeerOf(in.reply_ep) << ": " << valid.message();
    ReplyTo(in.reply_ep, in.header, valid);
    return UCS_OK;
  }
  if (!in.rendezvous) {
    Tensor payload;
    if (in.header.dtype != kNoDType) {
      auto t = codec_.TakePayload(in.header);
      if (!t.ok()) {
        ReplyTo(in.reply_ep, in.header, t.status());
        return UCS_OK;
      }
      payload = std::move(t).value();
      if (in.length > 0) std::memcpy(payload.data(), in.data, in.length);
    }
    inflight_bytes_[BudgetOf(in.header)] += in.length;
    Dispatch(in.header, std::move(payload), in.reply_ep);
    return UCS_OK;
  }
  const int budget = BudgetOf(in.header);
  if (inflight_bytes_[budget] > 0 &&
      inflight_bytes_[budget] + in.length > options_.max_inflight_bytes) {
    // Backpressure: leave the payload with the sender until bytes drain.
    deferred_[budget].push_back({in.header, in.data, in.reply_ep});
    return UCS_INPROGRESS;
  }
  StartReceive(in.header, in.data, in.reply_ep);
  return UCS_INPROGRESS;
}

void UcxDataPlane::StartReceive(const WireHeader& header, void* desc,
                                ucp_ep_h reply_ep) {
  auto t = codec_.TakePayload(header);
  if (!t.ok()) {
    codec_.Release(desc);
    ReplyTo(reply_ep, header, t.status());
    return;
  }
  inflight_bytes_[BudgetOf(header)] += header.payload_bytes;
  codec_.ReceiveRendezvous(
      desc, std::move(t).value(), header.payload_bytes,
      [this, header, reply_ep](Tensor payload, ucs_status_t status) {
        if (status == UCS_OK) {
          Dispatch(header, std::move(payload), reply_ep);
          return;
        }
        inflight_bytes_[BudgetOf(header)] -= header.payload_bytes;
        ReplyTo(reply_ep, header,
                UCX_STATUS(status, "receive request payload"));
      });
}

void UcxDataPlane::PumpDeferred() {
  for (int budget = 0; budget < 2; ++budget) {
    std::deque<Deferred>& deferred = deferred_[budget];
    while (!deferred.empty() &&
           (inflight_bytes_[budget] == 0 ||
            inflight_bytes_[budget] + deferred.front().header.payload_bytes <=
                options_.max_inflight_bytes)) {
      Deferred d = deferred.front();
      deferred.pop_front();
      if (endpoints_.state(d.reply_ep) == EndpointTable::State::kGone) {
        codec_.Release(d.desc);
        continue;
      }
      StartReceive(d.header, d.desc, d.reply_ep);
    }
  }
}

void UcxDataPlane::Dispatch(WireHeader header, Tensor payload,
                            ucp_ep_h reply_ep) {
  Message request;
  request.header = header;
  request.payload = std::move(payload);
  const size_t bytes = header.payload_bytes;
  const int budget = BudgetOf(header);
  auto answered = std::make_shared<std::atomic<bool>>(false);
  Reply reply = [this, reply_ep, bytes, budget, answered,
                 request_id = header.request_id](Message response) {
    if (answered->exchange(true)) {
      LOG(ERROR) << "data plane: request " << request_id
                 << " answered twice; ignoring the second reply";
      return;
    }
    response.header.request_id = request_id;
    auto send = [this, reply_ep, bytes, budget,
                 response = std::move(response)]() mutable {
      inflight_bytes_[budget] -= bytes;
      if (endpoints_.state(reply_ep) != EndpointTable::State::kGone) {
        codec_.Send(reply_ep, kResponseAm, std::move(response), 0);
      }
      PumpDeferred();
    };
    // From the handler itself, on the role holder: at once.
    if (driver_.OnRoleHolder()) {
      send();
    } else {
      driver_.Post(std::move(send));
    }
  };
  if (!handler_) {
    reply(ErrorResponse(
        header, FailedPreconditionError("this data plane serves no requests")));
    return;
  }
  handler_(std::move(request), std::move(reply));
}

ucs_status_t UcxDataPlane::OnResponse(const IncomingAm& in) {
  if (!in.header_complete()) {
    LOG(WARNING) << "data plane: dropping a response with a "
                 << in.header_length << "-byte header";
    return UCS_OK;
  }
  const WireHeader& h = in.header;
  if (pending_.Find(h.request_id) == nullptr) {
    VLOG(1) << "data plane: late response " << h.request_id;
    return UCS_OK;  // Timed out already; a rendezvous payload is dropped.
  }
  if (pending_.ChannelOf(h.request_id) != in.reply_ep) {
    // Only the connection a request went out on may answer it.
    endpoints_.Refuse(in.reply_ep,
                      "a response to another connection's request");
    return UCS_OK;
  }
  Status valid = ValidateHeader(h, in.header_length, in.length,
                                options_.max_payload_bytes);
  if (!valid.ok()) {
    pending_.Complete(h.request_id, valid.WithContext("malformed response"));
    return UCS_OK;
  }
  if (h.status_code != 0) {
    std::string text;
    if (!in.rendezvous) {
      text.assign(static_cast<const char*>(in.data), in.length);
    }
    pending_.Complete(h.request_id,
                      Status(static_cast<StatusCode>(h.status_code), text));
    return UCS_OK;
  }
  Message response;
  response.header = h;
  if (h.dtype != kNoDType) {
    // Into the sender's own tensor where it named one that fits.
    const Tensor into = pending_.TakeReceiveInto(h.request_id);
    StatusOr<Tensor> t =
        !into.empty() && static_cast<uint8_t>(into.dtype()) == h.dtype &&
                into.num_elements() == h.rows * h.cols
            ? into.Reshape({h.rows, h.cols})
            : codec_.TakePayload(h);
    if (!t.ok()) {
      pending_.Complete(h.request_id, t.status());
      return UCS_OK;
    }
    response.payload = std::move(t).value();
  }
  if (!in.rendezvous) {
    if (in.length > 0) std::memcpy(response.payload.data(), in.data, in.length);
    pending_.Complete(h.request_id, std::move(response));
    return UCS_OK;
  }
  codec_.ReceiveRendezvous(
      in.data, std::move(response.payload), in.length,
      [this, h](Tensor payload, ucs_status_t status) {
        if (status != UCS_OK) {
          pending_.Complete(h.request_id,
                            UCX_STATUS(status, "receive response payload"));
          return;
        }
        Message received;
        received.header = h;
        received.payload = std::move(payload);
        pending_.Complete(h.request_id, std::move(received));
      });
  return UCS_INPROGRESS;
}

}  // namespace

StatusOr<std::unique_ptr<DataPlane>> NewUcxDataPlane(
    const DataPlaneOptions& options) {
  if (options.secret.size() < kMinDataPlaneSecretBytes) {
    return InvalidArgumentError(
        "the data plane needs the cluster secret (at least " +
        std::to_string(kMinDataPlaneSecretBytes) + " bytes; got " +
        std::to_string(options.secret.size()) +
        "): every connection proves it holds the secret");
  }
  // transport.ucx first, so that its values win over the defaults below.
  // setenv is not safe against a getenv running in another thread at the
  // same time; workers and trainers get here while starting, when none of
  // their threads reads the environment (UCX reads it in Start()).
  for (const auto& [name, value] : options.ucx_env) {
    const char* current = std::getenv(name.c_str());
    if (current == nullptr) {
      ::setenv(name.c_str(), value.c_str(), /*overwrite=*/0);
      LOG(INFO) << "data plane: " << name << "=" << value << " (transport.ucx)";
    } else if (value != current) {
      LOG(WARNING) << "data plane: the environment's " << name << "=" << current
                   << " overrides transport.ucx (" << value << ")";
    }
  }
  // Endpoints use peer error handling, and UCX 1.13 then leaves out every
  // transport that cannot report a lost peer itself or invalidate remote
  // memory access: shared memory (posix/sysv) and CMA, so processes of one
  // host talked over TCP at a third of the bandwidth. Allow both: a lost
  // peer is still found by the connection manager's socket and UCX
  // keepalive, and every request here has its own deadline. Set in the
  // environment (UCX reads CMA's setting only from there), once, before
  // the first UCX call, never over a value the user set.
  static std::once_flag shm_settings;
  std::call_once(shm_settings, [] {
    ::setenv("UCX_MM_ERROR_HANDLING", "y", /*overwrite=*/0);
    ::setenv("UCX_CMA_MEMORY_INVALIDATE", "y", /*overwrite=*/0);
  });
  return std::unique_ptr<DataPlane>(new UcxDataPlane(options));
}

}  // namespace switchyard::transport
