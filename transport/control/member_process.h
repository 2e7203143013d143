// The lifecycle shared by `switchyard worker` and `switchyard train`:
// register, heartbeat, follow the routing table, and on SIGTERM or SIGINT
// leave the cluster and exit cleanly.
#ifndef SWITCHYARD_TRANSPORT_CONTROL_MEMBER_PROCESS_H_
#define SWITCHYARD_TRANSPORT_CONTROL_MEMBER_PROCESS_H_

#include <atomic>
#include <functional>
#include <string>
#include <vector>

#include "common/status.h"
#include "config.pb.h"
#include "control.pb.h"
#include "transport/control/member_session.h"

namespace switchyard::control {

struct MemberProcessOptions {
  config::SwitchyardConfig config;
  // Shared secret for control connections.
  std::string secret;
  // Who this process is; pid and host are filled in.
  RegisterRequest registration;
  // Runs on the control thread for every newer routing table.
  std::function<void(const RoutingTable&)> on_routing;
  // Per-shard token counts for heartbeats (optional).
  std::function<std::vector<ShardLoad>()> loads;
  // Adds to every heartbeat what the member reports with it (optional; on
  // the control thread).
  std::function<void(Heartbeat*)> annotate_heartbeat;
  // Heartbeat acknowledgements (optional; on the control thread).
  std::function<void(const HeartbeatAck&)> on_heartbeat_ack;
  // Registration responses, before their routing table (optional; on the
  // control thread).
  std::function<void(const RegisterResponse&)> on_registered;
  // Called once with the session, before it starts (optional): for calls
  // such as MemberSession::ReportCheckpoint. A copy may outlive
  // RunMemberProcess: it keeps the session's io_context alive with it.
  std::function<void(std::shared_ptr<MemberSession>)> on_session;
  // The process's work (optional), run on the calling thread once
  // registered; `stopping` turns true on SIGTERM/SIGINT and the body should
  // then return soon. Its status is the process's.
  std::function<Status(const std::atomic<bool>& stopping)> body;
  // Whether SIGTERM and SIGINT stop the member (a process of its own).
  // false for a member embedded in another program (a Python interpreter
  // keeps its own SIGINT): then only the body's return ends it.
  bool handle_signals = true;
};

// Blocks until SIGTERM or SIGINT (clean shutdown: OK) or, with a body, until
// it returns; or until the first registration fails for longer than
// cluster.call_timeout_ms * 6 (error).
Status RunMemberProcess(const MemberProcessOptions& options);

}  // namespace switchyard::control

#endif  // SWITCHYARD_TRANSPORT_CONTROL_MEMBER_PROCESS_H_
