// The data plane: tensors between trainers and workers (DESIGN.md, "Planes").
//
// One interface, with UCX (CPU; shared memory, TCP or RDMA as UCX chooses)
// now and NCCL (GPU) later. A DataPlane both serves requests (on its
// listening address) and sends them (to peers' addresses). Every request has
// a deadline: its callback runs exactly once, with the response, the peer's
// error, DEADLINE_EXCEEDED, or UNAVAILABLE when the peer is lost.
//
// Thread-safety: all methods are thread-safe. Handlers and callbacks run on
// the data plane's progress thread, or on a thread waiting in SendAndWait
// (which drives the network meanwhile), and must not block; hand work to
// another thread and call Reply from there.
#ifndef SWITCHYARD_TRANSPORT_DATA_PLANE_H_
#define SWITCHYARD_TRANSPORT_DATA_PLANE_H_

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "common/buffer_pool.h"
#include "common/mutex.h"
#include "common/status.h"
#include "common/tensor.h"
#include "common/thread_annotations.h"
#include "config.pb.h"
#include "transport/wire_header.h"

namespace switchyard::transport {

struct Message {
  WireHeader header;
  // The tensor payload (rows x cols of header.dtype); empty when none.
  Tensor payload;
  // The error text of an error response.
  std::string error_text;
  // On a request only, never sent: where its response's payload may land.
  // A data plane may receive a payload of this tensor's dtype and element
  // count straight into its storage (the response's payload then shares
  // it) rather than into a fresh buffer: a shard fetched into the shard
  // itself, with no copy and no second buffer to fault in. A hint; the
  // payload is a fresh buffer otherwise. The sender leaves the storage
  // alone until the request completes, and throws it away if the request
  // fails (a transfer under way may still write there).
  Tensor receive_into;
};

// Sends the response to one request. Call exactly once, from any thread.
using Reply = std::function<void(Message response)>;
using RequestHandler = std::function<void(Message request, Reply reply)>;
using ResponseCallback = std::function<void(StatusOr<Message> response)>;

// A response message answering `request` with `status` (its message becomes
// the error text).
Message ErrorResponse(const WireHeader& request, const Status& status);
// A message with `header`'s fields and `payload` (may be empty): dtype,
// shape and payload_bytes follow the payload; status_code is 0.
Message TensorMessage(const WireHeader& header, Tensor payload);
// A response message answering `request` with `payload` (may be empty).
inline Message TensorResponse(const WireHeader& request, Tensor payload) {
  return TensorMessage(request, std::move(payload));
}

// One request of SendAndWait.
struct SendRequest {
  std::string peer;
  Message message;
  std::chrono::milliseconds timeout;
  ResponseCallback done;
};

// The shortest cluster secret a data plane accepts (as the control plane).
constexpr size_t kMinDataPlaneSecretBytes = 16;

struct DataPlaneOptions {
  // The cluster secret (cluster.secret_file's bytes). Every connection
  // proves, both ways, that its ends hold it before any request crosses
  // (transport/ucx/peer_auth.h); NewUcxDataPlane refuses an empty one.
  std::string secret;
  // A connection whose handshake has not completed by then is closed.
  std::chrono::milliseconds handshake_timeout{5000};
  // Host to listen on; the port is chosen by the system (see address()).
  std::string listen_host = "127.0.0.1";
  // Passed to UCX as UCX_TLS when not empty (e.g. "tcp", "posix,cma,tcp").
  // UCX 1.13 sets up client-server connections over TCP, so a non-empty
  // list must include tcp (UCX still moves data over shared memory between
  // processes of one host when posix/cma/sysv are listed too).
  std::string ucx_tls;
  // Further UCX settings, by environment name (UCX_NET_DEVICES=mlx5_0:1).
  // UCX reads them from the process environment, so NewUcxDataPlane sets
  // them there, before the first UCX context of the process reads it; a
  // variable the environment already has keeps its value (and a warning
  // says so). Settings UCX reads when it loads (UCX_LOG_LEVEL, say) take
  // effect only from the environment the process starts with.
  std::map<std::string, std::string> ucx_env;
  // After any activity the progress thread polls without sleeping for this
  // long before it waits on the worker's event fd: lower latency for more
  // CPU. 0 sleeps at once.
  int busy_poll_us = 50;
  // The polling window adapts up to this (doubling while traffic comes
  // just after the thread sleeps, halving while it does not); at most
  // busy_poll_us keeps it fixed.
  int max_busy_poll_us = 1000;
  // Request bytes a server holds (received, not yet answered) before it
  // stops fetching large payloads (backpressure on senders).
  size_t max_inflight_bytes = size_t{1} << 30;
  // Request kinds (MessageKind) with a budget of their own, of
  // max_inflight_bytes too: requests the server answers without waiting
  // for the others (a worker's hot-expert replica requests), which a budget
  // full of the others must not hold up.
  std::set<uint8_t> own_budget_kinds;
  // Idle receive buffers kept for reuse (BufferPool).
  size_t pool_cached_bytes = size_t{1} << 30;
  // Largest payload accepted.
  size_t max_payload_bytes = size_t{1} << 31;
  // Payloads from this size up go by rendezvous, received straight into the
  // destination tensor; smaller ones are sent eagerly.
  size_t rendezvous_threshold_bytes = 64 * 1024;
};

class DataPlane {
 public:
  virtual ~DataPlane() = default;

  // Listens and starts the progress thread; `handler` serves requests.
  virtual Status Start(RequestHandler handler) = 0;
  // Fails every pending request with CANCELLED and stops. Idempotent.
  virtual void Shutdown() = 0;
  // "host:port" peers use to reach this data plane.
  virtual std::string address() const = 0;

  // Completes every request pending now with `why`, as if its deadline
  // had passed: the sender gave up on them (a trainer that learns of a new
  // routing epoch abandons its step in flight rather than wait on a peer
  // that may be gone). Requests sent after the call are unaffected.
  // Thread-safe; never blocks.
  virtual void FailPending(const Status& why) = 0;

  // Called on the data plane's thread (it must not block) when a
  // connection to `peer` fails with requests pending (why: UNAVAILABLE or
  // UNAUTHENTICATED), or a request to `peer` gets no answer by its deadline
  // (why: DEADLINE_EXCEEDED; once per peer per expiry sweep): the peer may
  // be gone, cut off from here, hung, or rightly waiting for something
  // else. Set before Start.
  using PeerLostHandler =
      std::function<void(const std::string& peer, const Status& why)>;
  void set_peer_lost_handler(PeerLostHandler handler) {
    peer_lost_ = std::move(handler);
  }

  // Sends `request` to the data plane at `peer` ("host:port").
  virtual void Send(const std::string& peer, Message request,
                    std::chrono::milliseconds timeout,
                    ResponseCallback done) = 0;

  // Opens the connection to `peer`, its handshake included, ahead of a
  // first request that should not wait for it (a live move's new home
  // connects to the old home while the trainers finish their step).
  // Nothing happens where one is up or opening; a failure shows at the
  // next request. Thread-safe; never blocks.
  virtual void Connect(const std::string& peer) { (void)peer; }

  // How requests to `peer` travel, once a connection to it is up: the
  // transport each kind of traffic uses, e.g. "am=posix/memory
  // rma_bw=cma/memory" (also logged when the connection comes up); empty
  // before.
  virtual std::string ConnectionInfo(const std::string& peer) const {
    (void)peer;
    return "";
  }

  // Sends every request (as Send) and then blocks until `done()` is true or
  // `deadline` passes, waiting on `cv` in a loop as CondVar's comment
  // shows; returns done(). `mu` is held on entry and on return, and
  // released while sending; done() is called with it held. The requests'
  // callbacks change what done() reads under `mu` and notify `cv`. The UCX
  // plane lets the waiting thread drive the network itself meanwhile (the
  // callbacks then run on it), so that an answer reaches the waiter
  // without a thread hand-off: on a 2-core VM each hand-off is a wake-up of
  // about 13 us, against a 2-3 us shared-memory round trip. Must not be
  // called from a handler or callback.
  virtual bool SendAndWait(std::vector<SendRequest> requests, Mutex* mu,
                           CondVar* cv,
                           std::chrono::steady_clock::time_point deadline,
                           const std::function<bool()>& done) REQUIRES(mu);

  // Blocking Send (through SendAndWait). Must not be called from a handler
  // or callback.
  StatusOr<Message> SendSync(const std::string& peer, Message request,
                             std::chrono::milliseconds timeout);

 protected:
  void NotifyPeerLost(const std::string& peer, const Status& why) const {
    if (peer_lost_) peer_lost_(peer, why);
  }

 private:
  PeerLostHandler peer_lost_;
};

// One request of a fan-out: where it goes and what names it in errors.
struct Outgoing {
  std::string peer;
  Message message;
  std::string label;
};

// Sends every request concurrently and waits for all of them. Returns the
// responses' payloads in request order (fp32 payloads as they came; others
// converted to fp32), or the first failure, prefixed with its label. A
// request answered ABORTED (the peer is not ready for it yet and changed
// nothing: e.g. it has not received the sender's routing epoch) is sent
// again after a short backoff. Everything ends by `timeout` (plus a
// scheduling margin). Conversions to fp32 go into buffers from `pool`
// when one is given (fresh memory otherwise).
StatusOr<std::vector<Tensor>> SendAll(DataPlane* data_plane,
                                      std::vector<Outgoing> requests,
                                      std::chrono::milliseconds timeout,
                                      BufferPool* pool = nullptr);

StatusOr<std::unique_ptr<DataPlane>> NewUcxDataPlane(
    const DataPlaneOptions& options);

// The options a run's configuration gives (the cluster secret,
// transport.data_host, ucx_tls, ucx, max_inflight_bytes with the replica
// kinds on a budget of their own, busy_poll_us,
// cluster.call_timeout_ms as the handshake timeout); the rest keep their
// defaults.
DataPlaneOptions DataPlaneOptionsFrom(const config::SwitchyardConfig& config,
                                      const std::string& secret);

// A handler for a data plane that only sends (a trainer's): every request
// is refused with INVALID_ARGUMENT saying `who` serves none.
RequestHandler RefuseRequests(const std::string& who);

}  // namespace switchyard::transport

#endif  // SWITCHYARD_TRANSPORT_DATA_PLANE_H_
