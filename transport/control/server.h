// Accepts control connections and hands authenticated ones to handlers.
//
// Unauthenticated connections are bounded: at most
// AdmissionLimits::max_handshakes at once, and max_handshakes_per_address
// from one peer address. A new connection beyond a limit closes the oldest
// handshake in progress (of that address when its own limit is reached), so a
// flood of idle peers cannot lock out a member that completes its handshake
// in one round trip. Failed accepts (out of file descriptors) back off from
// 10 ms to 1 s and log at most one line per 10 s.
//
// Thread-safety: Listen/Shutdown from any thread; handlers run on each
// connection's strand. The server keeps its live connections; Shutdown closes
// them all.
#ifndef SWITCHYARD_TRANSPORT_CONTROL_SERVER_H_
#define SWITCHYARD_TRANSPORT_CONTROL_SERVER_H_

#include <boost/asio.hpp>
#include <chrono>
#include <list>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "common/mutex.h"
#include "common/net_address.h"
#include "common/status.h"
#include "common/thread_annotations.h"
#include "transport/control/connection.h"

namespace switchyard::control {

struct AdmissionLimits {
  size_t max_handshakes = 256;
  size_t max_handshakes_per_address = 64;
};

class ControlServer {
 public:
  // `handlers.on_ready` and `on_close` are wrapped so the server can track
  // handshakes and forget closed connections.
  ControlServer(boost::asio::io_context& io, ControlOptions options,
                Connection::Handlers handlers, AdmissionLimits limits = {});
  // Destroy only after the io_context has stopped running.
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Binds and starts accepting. Port 0 picks a free port (see port()).
  Status Listen(const HostPort& address);
  uint16_t port() const { return port_; }
  void Shutdown() EXCLUDES(mu_);

  // Connections whose handshake is in progress (for tests and status).
  size_t handshakes_in_progress() const EXCLUDES(mu_);

 private:
  struct Handshake {
    Connection::Ptr connection;
    std::string address;
  };

  void DoAccept();
  void OnAccepted(boost::asio::ip::tcp::socket socket);
  // Logs a failed accept (rate-limited) and retries after a backoff.
  void OnAcceptError(const boost::system::error_code& ec);
  // Records `conn` as a handshake in progress; returns the connection to
  // close to stay within the limits, if any.
  Connection::Ptr AdmitLocked(const Connection::Ptr& conn,
                              const std::string& address) REQUIRES(mu_);
  void ForgetHandshakeLocked(const Connection* conn) REQUIRES(mu_);

  boost::asio::io_context& io_;
  const ControlOptions options_;
  Connection::Handlers handlers_;
  const AdmissionLimits limits_;
  boost::asio::ip::tcp::acceptor acceptor_;
  uint16_t port_ = 0;

  // Touched only by the accept chain (one handler at a time).
  boost::asio::steady_timer accept_retry_timer_;
  std::chrono::milliseconds accept_backoff_{0};
  std::chrono::steady_clock::time_point last_accept_error_log_;
  uint64_t accept_errors_unlogged_ = 0;

  mutable Mutex mu_;
  std::set<Connection::Ptr> connections_ GUARDED_BY(mu_);
  // Handshakes in progress, oldest first.
  std::list<Handshake> handshakes_ GUARDED_BY(mu_);
  std::map<std::string, size_t> handshakes_per_address_ GUARDED_BY(mu_);
  bool shut_down_ GUARDED_BY(mu_) = false;
};

}  // namespace switchyard::control

#endif  // SWITCHYARD_TRANSPORT_CONTROL_SERVER_H_
