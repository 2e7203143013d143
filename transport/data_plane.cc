#include "transport/data_plane.h"

#include <algorithm>
#include <optional>
#include <thread>

namespace switchyard::transport {

Message ErrorResponse(const WireHeader& request, const Status& status) {
  Message m;
  m.header = request;
  m.header.status_code =
      static_cast<int32_t>(status.ok() ? StatusCode::kInternal : status.code());
  m.header.dtype = kNoDType;
  m.header.rows = m.header.cols = 0;
  m.error_text = status.message();
  m.header.payload_bytes = m.error_text.size();
  return m;
}

Message TensorMessage(const WireHeader& header, Tensor payload) {
  Message m;
  m.header = header;
  m.header.status_code = 0;
  if (payload.empty()) {
    m.header.dtype = kNoDType;
    m.header.rows = m.header.cols = 0;
    m.header.payload_bytes = 0;
  } else {
    m.header.dtype = static_cast<uint8_t>(payload.dtype());
    m.header.rows = payload.rank() == 2 ? payload.dim(0) : 1;
    m.header.cols =
        payload.rank() == 2 ? payload.dim(1) : payload.num_elements();
    m.header.payload_bytes = payload.num_bytes();
  }
  m.payload = std::move(payload);
  return m;
}

namespace {

// `t` as fp32: itself when it is (or is empty), else converted into a
// buffer from `pool` (fresh memory without one).
StatusOr<Tensor> ToF32(Tensor t, BufferPool* pool) {
  if (t.empty() || t.dtype() == DType::kF32) return t;
  if (pool == nullptr) return t.To(DType::kF32);
  return pool->Converted(t, DType::kF32);
}

}  // namespace

StatusOr<std::vector<Tensor>> SendAll(DataPlane* data_plane,
                                      std::vector<Outgoing> requests,
                                      std::chrono::milliseconds timeout,
                                      BufferPool* pool) {
  struct Pending {
    Mutex mu;
    CondVar cv;
    size_t outstanding GUARDED_BY(mu) = 0;
    std::vector<Tensor> replies GUARDED_BY(mu);
    std::vector<size_t> retry GUARDED_BY(mu);  // Requests answered ABORTED.
    Status error GUARDED_BY(mu);
  };
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto pending = std::make_shared<Pending>();
  {
    MutexLock lock(&pending->mu);
    pending->replies.resize(requests.size());
  }
  std::vector<size_t> to_send(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) to_send[i] = i;
  for (int attempt = 0;; ++attempt) {
    {
      MutexLock lock(&pending->mu);
      pending->outstanding = to_send.size();
      pending->retry.clear();
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    std::vector<SendRequest> sends;
    for (size_t i : to_send) {
      // Messages share their payload's storage: a copy is cheap, and the
      // original stays for a retry.
      sends.push_back(SendRequest{
          requests[i].peer, requests[i].message,
          std::max(left, std::chrono::milliseconds(1)),
          [pending, i, pool, label = requests[i].label](StatusOr<Message> r) {
            MutexLock lock(&pending->mu);
            if (!r.ok() && r.status().code() == StatusCode::kAborted) {
              pending->retry.push_back(i);
            } else if (!r.ok()) {
              if (pending->error.ok())
                pending->error = r.status().WithContext(label);
            } else if (StatusOr<Tensor> t = ToF32(std::move(r->payload), pool);
                       t.ok()) {
              pending->replies[i] = std::move(t).value();
            } else if (pending->error.ok()) {
              pending->error = t.status().WithContext(label);
            }
            if (--pending->outstanding == 0) pending->cv.NotifyAll();
          }});
    }
    MutexLock lock(&pending->mu);
    // Each callback runs by its request's deadline; the margin covers
    // scheduling only.
    if (!data_plane->SendAndWait(std::move(sends), &pending->mu, &pending->cv,
                                 deadline + std::chrono::seconds(5), [&] {
                                   // SendAndWait holds mu when it asks.
                                   pending->mu.AssertHeld();
                                   return pending->outstanding == 0;
                                 })) {
      return DeadlineExceededError(std::to_string(pending->outstanding) +
                                   " data-plane requests not answered");
    }
    if (!pending->error.ok()) return pending->error;
    if (pending->retry.empty()) return std::move(pending->replies);
    // ABORTED: the peer is not ready for this request yet (a routing table
    // it has not received); it changed nothing, so send it again shortly.
    if (std::chrono::steady_clock::now() + std::chrono::milliseconds(10) >=
        deadline) {
      return DeadlineExceededError(
          requests[pending->retry.front()].label +
          ": still refused as not ready (ABORTED) at the deadline");
    }
    to_send = pending->retry;
    lock.Unlock();
    std::this_thread::sleep_for(
        std::chrono::milliseconds(std::min(100, 5 << std::min(attempt, 4))));
  }
}

DataPlaneOptions DataPlaneOptionsFrom(const config::SwitchyardConfig& run,
                                      const std::string& secret) {
  const config::TransportConfig& config = run.transport();
  DataPlaneOptions options;
  options.secret = secret;
  options.handshake_timeout =
      std::chrono::milliseconds(run.cluster().call_timeout_ms());
  options.listen_host = config.data_host();
  options.ucx_tls = config.ucx_tls();
  options.ucx_env.insert(config.ucx().begin(), config.ucx().end());
  options.max_inflight_bytes = config.max_inflight_bytes();
  // A worker's copies answer replica requests on a thread of their own:
  // trainers' requests waiting for the worker's compute thread must not
  // hold them up (two workers each waiting for a copy on the other).
  for (const MessageKind kind :
       {MessageKind::kReplicaWeights, MessageKind::kReplicaForward,
        MessageKind::kReplicaBackward, MessageKind::kReplicaShare,
        MessageKind::kReplicaDrop}) {
    options.own_budget_kinds.insert(static_cast<uint8_t>(kind));
  }
  options.busy_poll_us = config.busy_poll_us();
  options.max_busy_poll_us = config.max_busy_poll_us();
  return options;
}

RequestHandler RefuseRequests(const std::string& who) {
  return [who](Message request, Reply reply) {
    reply(ErrorResponse(request.header,
                        InvalidArgumentError(who + " serves no data-plane "
                                                   "requests")));
  };
}

bool DataPlane::SendAndWait(std::vector<SendRequest> requests, Mutex* mu,
                            CondVar* cv,
                            std::chrono::steady_clock::time_point deadline,
                            const std::function<bool()>& done) {
  mu->Unlock();  // Callbacks may run inside Send.
  for (SendRequest& r : requests) {
    Send(r.peer, std::move(r.message), r.timeout, std::move(r.done));
  }
  mu->Lock();
  while (!done()) {
    if (!cv->WaitUntil(mu, deadline)) return done();
  }
  return true;
}

StatusOr<Message> DataPlane::SendSync(const std::string& peer, Message request,
                                      std::chrono::milliseconds timeout) {
  struct Answer {
    Mutex mu;
    CondVar cv;
    std::optional<StatusOr<Message>> result GUARDED_BY(mu);
  };
  auto answer = std::make_shared<Answer>();
  std::vector<SendRequest> send;
  send.push_back(SendRequest{peer, std::move(request), timeout,
                             [answer](StatusOr<Message> r) {
                               MutexLock lock(&answer->mu);
                               answer->result = std::move(r);
                               answer->cv.NotifyOne();
                             }});
  MutexLock lock(&answer->mu);
  // Send guarantees the callback by the deadline; the margin covers
  // scheduling only.
  if (!SendAndWait(
          std::move(send), &answer->mu, &answer->cv,
          std::chrono::steady_clock::now() + timeout + std::chrono::seconds(5),
          [&] {
            answer->mu.AssertHeld();  // SendAndWait holds mu when it asks.
            return answer->result.has_value();
          })) {
    return DeadlineExceededError("no data-plane answer from " + peer);
  }
  return std::move(*answer->result);
}

}  // namespace switchyard::transport
