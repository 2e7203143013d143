// A worker's or trainer's membership in the cluster.
//
// Registers with the coordinator on every (re)connection, heartbeats every
// heartbeat period, and re-registers (as a new incarnation) when the
// coordinator says this incarnation is fenced. After a coordinator restart it
// re-registers with its previous incarnation, which the coordinator confirms
// without fencing. Routing tables (in responses and pushes) are delivered to
// on_routing in epoch order; older ones are dropped.
//
// Thread-safety: public methods are thread-safe; on_routing runs on the
// io_context thread.
#ifndef SWITCHYARD_TRANSPORT_CONTROL_MEMBER_SESSION_H_
#define SWITCHYARD_TRANSPORT_CONTROL_MEMBER_SESSION_H_

#include <boost/asio.hpp>
#include <chrono>
#include <functional>
#include <memory>
#include <vector>

#include "common/mutex.h"
#include "common/status.h"
#include "common/thread_annotations.h"
#include "config.pb.h"
#include "control.pb.h"
#include "transport/control/client.h"

namespace switchyard::control {

struct MemberSessionOptions {
  ClientOptions client;
  RegisterRequest registration;
  std::chrono::milliseconds heartbeat_period{1000};
  std::chrono::milliseconds call_timeout{5000};
  // Per-shard token counts to report with each heartbeat (may be empty).
  std::function<std::vector<ShardLoad>()> loads;
  // Adds to every heartbeat what the member reports with it (may be
  // empty; on the io_context thread).
  std::function<void(Heartbeat*)> annotate_heartbeat;
  // Runs on the io_context thread with every heartbeat acknowledgement
  // (committed checkpoints; may be empty).
  std::function<void(const HeartbeatAck&)> on_heartbeat_ack;
  // Runs on the io_context thread with every registration's response,
  // before its routing table is delivered (may be empty).
  std::function<void(const RegisterResponse&)> on_registered;
};

class MemberSession : public std::enable_shared_from_this<MemberSession> {
 public:
  using Ptr = std::shared_ptr<MemberSession>;
  using RoutingHandler = std::function<void(const RoutingTable&)>;

  static Ptr Create(boost::asio::io_context& io, MemberSessionOptions options,
                    RoutingHandler on_routing);

  void Start();
  // Waits for the first successful registration.
  Status WaitRegistered(std::chrono::milliseconds timeout) EXCLUDES(mu_);
  // Stops heartbeating; with `leave`, tells the coordinator first (bounded by
  // the call timeout). Must not be called on the io_context thread.
  void Shutdown(bool leave) EXCLUDES(mu_);

  // Sends a heartbeat now (as well as the periodic ones): news the
  // coordinator waits for.
  void HeartbeatNow();

  // Tells the coordinator that this member's data-plane connection to a
  // worker failed (PeerLost; name and incarnation filled in). Does not
  // wait: the outcome is logged. Any thread.
  void ReportPeerLost(PeerLost report) EXCLUDES(mu_);

  // Asks the coordinator to drain this worker (DrainRequest): its shards
  // move to the others, then heartbeat acks say `drained`. Blocking,
  // bounded by the call timeout; not on the io_context thread.
  StatusOr<DrainResponse> Drain();

  uint64_t incarnation() const EXCLUDES(mu_);
  RoutingTable routing() const EXCLUDES(mu_);

  // Tells the coordinator this worker's shards are durable at report.step
  // (the name is filled in, and the incarnation unless the report carries
  // the one its checkpoint was taken under). Blocking, bounded by the call
  // timeout; must not be called on the io_context thread.
  StatusOr<CheckpointReportAck> ReportCheckpoint(CheckpointReport report)
      EXCLUDES(mu_);

 private:
  MemberSession(boost::asio::io_context& io, MemberSessionOptions options,
                RoutingHandler on_routing);
  void Register() EXCLUDES(mu_);
  void ScheduleHeartbeat() EXCLUDES(mu_);
  // One heartbeat (or a registration, when not registered).
  void SendHeartbeat() EXCLUDES(mu_);
  void DeliverRouting(const RoutingTable& table) EXCLUDES(mu_);

  boost::asio::io_context& io_;
  const MemberSessionOptions options_;
  RoutingHandler on_routing_;
  ControlClient::Ptr client_;
  boost::asio::steady_timer heartbeat_timer_;

  mutable Mutex mu_;
  CondVar cv_;
  uint64_t incarnation_ GUARDED_BY(mu_) = 0;  // 0 until registered
  // The run last heard from and the newest commit it announced (sent with
  // every registration; see RegisterRequest.run_id).
  std::string seen_run_id_ GUARDED_BY(mu_);
  int64_t seen_committed_step_ GUARDED_BY(mu_) = 0;
  bool registered_ GUARDED_BY(mu_) = false;
  bool registering_ GUARDED_BY(mu_) = false;
  bool stopped_ GUARDED_BY(mu_) = false;
  Status last_error_ GUARDED_BY(mu_) = UnavailableError("not registered yet");
  RoutingTable routing_ GUARDED_BY(mu_);
};

}  // namespace switchyard::control

#endif  // SWITCHYARD_TRANSPORT_CONTROL_MEMBER_SESSION_H_
