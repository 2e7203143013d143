// EndpointTable: a UCX data plane's connections. It listens for peers
// (server-side endpoints), connects to peers by "host:port" and caches one
// client endpoint per peer, tracks each endpoint's wire-up, and drops an
// endpoint whose peer is lost (UCX peer error handling), telling the owner
// so that the requests pending on it fail.
//
// A client endpoint carries requests only once its wire-up has finished
// (its first flush) and the peer has authenticated: sends wait in Park
// until then, since UCX 1.13 fails an assertion when a rendezvous send
// queued during wire-up is replayed on lanes that changed under it (TCP ->
// CMA), and no request may reach a peer that has not proved it holds the
// cluster secret.
//
// Authentication (peer_auth.h): the table runs the handshake on every
// endpoint, as client after wire-up and as server on accept. A server-side
// endpoint is Authenticated only once the peer's proof checks; one that
// fails, sends anything else first, or has not finished within the
// handshake timeout is dropped with one log line (Refuse). A client whose
// peer fails to prove itself, refuses our proof or does not finish in time
// drops the endpoint with UNAUTHENTICATED or DEADLINE_EXCEEDED, which fails
// the requests parked on it.
//
// Thread-safety: every method but ConnectionInfo is for the data plane's
// role holder only (the one thread calling UCX at a time); ConnectionInfo
// is thread-safe. Ownership: the table owns its endpoints and listener
// until Close; the worker is the caller's and must outlive them.
#ifndef SWITCHYARD_TRANSPORT_UCX_ENDPOINT_TABLE_H_
#define SWITCHYARD_TRANSPORT_UCX_ENDPOINT_TABLE_H_

#include <ucp/api/ucp.h>

#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/mutex.h"
#include "common/status.h"
#include "transport/ucx/peer_auth.h"

namespace switchyard::transport {

class EndpointTable {
 public:
  struct Callbacks {
    // Runs `fn` later on the role holder, outside UCX's callbacks; false
    // once the plane no longer runs commands.
    std::function<bool(std::function<void()> fn)> post;
    // `ep` (to or from `peer`) is gone, for `why`: fail what is pending on
    // it. Runs before the endpoint is closed.
    std::function<void(ucp_ep_h ep, const std::string& peer, const Status& why)>
        lost;
  };
  enum class State {
    kGone,        // Not (or no longer) in the table.
    kConnecting,  // Client side, wire-up not finished: Park sends.
    kReady,
  };

  // `secret`: the cluster secret both ends must hold (at least 16 bytes).
  EndpointTable(std::string secret, std::chrono::milliseconds handshake_timeout,
                Callbacks callbacks);
  EndpointTable(const EndpointTable&) = delete;
  EndpointTable& operator=(const EndpointTable&) = delete;

  // Installs the handshake's message handler on `worker`, then listens on
  // `host` at a port the system picks; every later call uses `worker`.
  // `*address` becomes "host:port".
  Status Listen(ucp_worker_h worker, const std::string& host,
                std::string* address);

  // The client endpoint to `peer` ("host:port"), connecting when there is
  // none. Its wire-up may fail at once, dropping it: check State.
  StatusOr<ucp_ep_h> Connect(const std::string& peer);
  State state(ucp_ep_h ep) const;
  // Whether `ep` is known and its peer has proved it holds the secret.
  bool Authenticated(ucp_ep_h ep) const { return state(ep) == State::kReady; }
  // Drops `ep`, whose peer sent `what` before authenticating, with one log
  // line; nothing when it is already gone.
  void Refuse(ucp_ep_h ep, const std::string& what);
  // Drops the endpoints whose handshake has outlived its timeout; true when
  // any.
  bool ExpireHandshakes(std::chrono::steady_clock::time_point now);
  // The earliest handshake deadline (time_point::max() when none).
  std::chrono::steady_clock::time_point NextHandshakeDeadline() const;
  // Runs `send` once `ep`'s wire-up has finished (not at all when it fails
  // or `ep` is dropped first). `ep` must be kConnecting.
  void Park(ucp_ep_h ep, std::function<void()> send);
  // The peer's address ("?" for null or an unknown endpoint).
  std::string PeerOf(ucp_ep_h ep) const;
  // Whether any peer has connected to us (and may send us requests).
  bool HasServerSide() const;

  // How requests to `peer` travel ("am=posix/memory rma_bw=cma/memory"),
  // once its client endpoint is up; empty before and after it is lost.
  std::string ConnectionInfo(const std::string& peer) const EXCLUDES(lanes_mu_);

  // Force-closes every endpoint (waiting at most 500 ms: never blocking on
  // the network) and destroys the listener.
  void Close();

 private:
  enum class Auth {
    kClientWiringUp,         // Client: the wire-up flush has not finished.
    kClientAwaitsChallenge,  // Client: Hello sent.
    kClientAwaitsVerdict,    // Client: Proof sent.
    kServerAwaitsHello,
    kServerAwaitsProof,  // Server: Challenge sent.
    kDone,
  };
  struct Info {
    std::string peer;
    bool client_side = false;
    Auth auth = Auth::kServerAwaitsHello;
    std::chrono::steady_clock::time_point handshake_deadline;
    std::string own_nonce;
    std::string peer_nonce;
    std::vector<std::function<void()>> parked;
  };

  // A connection request on the listener.
  void Accept(ucp_conn_request_h request);
  // A handshake message from `ep`'s peer.
  void OnAuthMessage(ucp_ep_h ep, const void* bytes, size_t length);
  // The server's side of one handshake step.
  void ServerStep(ucp_ep_h ep, Info& info, const AuthMessage& message);
  // The client's side of one handshake step.
  void ClientStep(ucp_ep_h ep, Info& info, const AuthMessage& message);
  // Sends `message` over `ep`; drops `ep` once it is sent when
  // `drop_after_send` (a refusal) says why.
  void SendAuth(ucp_ep_h ep, const AuthMessage& message,
                const Status& drop_after_send = OkStatus());
  // Client: the peer accepted our proof; runs the parked sends.
  void FinishClientHandshake(ucp_ep_h ep, Info& info);
  // Peer error handling: a lost peer drops its endpoint.
  void SetPeerErrorHandling(ucp_ep_params_t* params);
  // The wire-up flush of `ep` finished: runs its parked sends, or drops it
  // when `status` is an error.
  void WiredUp(ucp_ep_h ep, ucs_status_t status);
  // Forgets `ep`, tells Callbacks::lost, and closes it (posted: not from
  // within UCX's error callback).
  void Drop(ucp_ep_h ep, const Status& why);

  const std::string secret_;
  const std::chrono::milliseconds handshake_timeout_;
  const Callbacks callbacks_;
  ucp_worker_h worker_ = nullptr;
  ucp_listener_h listener_ = nullptr;
  std::map<std::string, ucp_ep_h> client_eps_;
  std::unordered_map<ucp_ep_h, Info> eps_;

  mutable Mutex lanes_mu_;
  std::map<std::string, std::string> lanes_ GUARDED_BY(lanes_mu_);
};

}  // namespace switchyard::transport

#endif  // SWITCHYARD_TRANSPORT_UCX_ENDPOINT_TABLE_H_
