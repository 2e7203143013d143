#include "transport/control/member_process.h"

#include <unistd.h>

#include <boost/asio.hpp>
#include <future>
#include <thread>

#include "common/net_address.h"
#include "transport/control/member_session.h"

namespace switchyard::control {

namespace asio = boost::asio;

Status RunMemberProcess(const MemberProcessOptions& options) {
  const auto& cluster = options.config.cluster();
  ASSIGN_OR_RETURN(HostPort coordinator,
                   ParseHostPort(cluster.coordinator_address()));
  if (coordinator.port == 0) {
    return InvalidArgumentError(
        "cluster.coordinator_address has port 0; members need the "
        "coordinator's real port");
  }
  MemberSessionOptions session_options;
  session_options.client.server = coordinator;
  session_options.client.control.secret = options.secret;
  session_options.client.control.max_frame_bytes = cluster.max_frame_bytes();
  session_options.client.control.handshake_timeout =
      std::chrono::milliseconds(cluster.call_timeout_ms());
  session_options.registration = options.registration;
  session_options.registration.set_pid(static_cast<int32_t>(::getpid()));
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  session_options.registration.set_host(host);
  session_options.heartbeat_period =
      std::chrono::milliseconds(cluster.heartbeat_ms());
  session_options.call_timeout =
      std::chrono::milliseconds(cluster.call_timeout_ms());
  session_options.loads = options.loads;
  session_options.on_heartbeat_ack = options.on_heartbeat_ack;
  session_options.annotate_heartbeat = options.annotate_heartbeat;
  session_options.on_registered = options.on_registered;

  // The io_context lives as long as the session does: a session handed out
  // (on_session) may be released after this returns, and its timers belong
  // to the io_context's services (ASan: a worker's session freed after the
  // io_context was a heap-use-after-free at every SIGTERM). Members are
  // destroyed in reverse: the session first, then its io_context.
  struct SessionAndIo {
    asio::io_context io;
    std::shared_ptr<MemberSession> session;
  };
  auto owner = std::make_shared<SessionAndIo>();
  asio::io_context& io = owner->io;
  auto work = asio::make_work_guard(io);
  std::promise<int> stop_signal;
  std::atomic<bool> stopping{false};
  asio::signal_set signals(io);
  if (options.handle_signals) {
    signals.add(SIGTERM);
    signals.add(SIGINT);
  }
  signals.async_wait(
      [&stop_signal, &stopping](const boost::system::error_code& ec, int sig) {
        if (ec) return;
        stopping = true;
        stop_signal.set_value(sig);
      });
  owner->session =
      MemberSession::Create(io, session_options, options.on_routing);
  // Shares ownership of `owner`, pointing at its session.
  const std::shared_ptr<MemberSession> session(owner, owner->session.get());
  if (options.on_session) options.on_session(session);
  std::thread io_thread([&io] { io.run(); });
  session->Start();

  const std::string& name = options.registration.name();
  Status result = session->WaitRegistered(
      std::chrono::milliseconds(int64_t{cluster.call_timeout_ms()} * 6));
  if (result.ok() && options.body) {
    LOG(INFO) << name << ": registered with the coordinator at "
              << coordinator.ToString();
    result = options.body(stopping);
    LOG(INFO) << name
              << (stopping ? ": stopped by a signal, leaving"
                           : ": done, leaving");
  } else if (result.ok()) {
    LOG(INFO) << name << ": registered with the coordinator at "
              << coordinator.ToString() << "; waiting for SIGTERM/SIGINT";
    const int sig = stop_signal.get_future().get();
    LOG(INFO) << name << ": received signal " << sig << ", leaving";
  } else {
    result = result.WithContext(name + " could not join the cluster at " +
                                coordinator.ToString());
  }
  session->Shutdown(/*leave=*/result.ok());
  signals.cancel();
  work.reset();
  io.stop();
  io_thread.join();
  return result;
}

}  // namespace switchyard::control
