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
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "common/status.h"
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
  // Runs on the io_context thread with every heartbeat acknowledgement
  // (committed checkpoints; may be empty).
  std::function<void(const HeartbeatAck&)> on_heartbeat_ack;
};

class MemberSession : public std::enable_shared_from_this<MemberSession> {
 public:
  using Ptr = std::shared_ptr<MemberSession>;
  using RoutingHandler = std::function<void(const RoutingTable&)>;

  static Ptr Create(boost::asio::io_context& io, MemberSessionOptions options,
                    RoutingHandler on_routing);

  void Start();
  // Waits for the first successful registration.
  Status WaitRegistered(std::chrono::milliseconds timeout);
  // Stops heartbeating; with `leave`, tells the coordinator first (bounded by
  // the call timeout). Must not be called on the io_context thread.
  void Shutdown(bool leave);

  uint64_t incarnation() const;
  RoutingTable routing() const;

  // Tells the coordinator this worker's shards are durable at report.step
  // (name and incarnation are filled in). Blocking, bounded by the call
  // timeout; must not be called on the io_context thread.
  StatusOr<CheckpointReportAck> ReportCheckpoint(CheckpointReport report);

 private:
  MemberSession(boost::asio::io_context& io, MemberSessionOptions options,
                RoutingHandler on_routing);
  void Register();
  void ScheduleHeartbeat();
  void DeliverRouting(const RoutingTable& table);

  boost::asio::io_context& io_;
  const MemberSessionOptions options_;
  RoutingHandler on_routing_;
  ControlClient::Ptr client_;
  boost::asio::steady_timer heartbeat_timer_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t incarnation_ = 0;  // GUARDED_BY(mu_); 0 until registered
  bool registered_ = false;   // GUARDED_BY(mu_)
  bool registering_ = false;  // GUARDED_BY(mu_)
  bool stopped_ = false;      // GUARDED_BY(mu_)
  Status last_error_ = UnavailableError("not registered yet");  // GUARDED_BY
  RoutingTable routing_;  // GUARDED_BY(mu_)
};

}  // namespace switchyard::control

#endif  // SWITCHYARD_TRANSPORT_CONTROL_MEMBER_SESSION_H_
