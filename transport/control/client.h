// A control-plane client that stays connected.
//
// Connects to one server, authenticates, and reconnects with exponential
// backoff (min_backoff doubling to max_backoff) whenever the connection
// drops, until Shutdown. on_connected runs after every successful handshake
// (re-register there); on_push receives server pushes.
//
// Thread-safety: all public methods are thread-safe. Callbacks run on the
// io_context's threads. CallSync must not be called from those threads.
#ifndef SWITCHYARD_TRANSPORT_CONTROL_CLIENT_H_
#define SWITCHYARD_TRANSPORT_CONTROL_CLIENT_H_

#include <boost/asio.hpp>
#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "common/mutex.h"
#include "common/net_address.h"
#include "common/status.h"
#include "common/thread_annotations.h"
#include "transport/control/connection.h"

namespace switchyard::control {

struct ClientOptions {
  HostPort server;
  ControlOptions control;
  std::chrono::milliseconds min_backoff{100};
  std::chrono::milliseconds max_backoff{3000};
};

class ControlClient : public std::enable_shared_from_this<ControlClient> {
 public:
  using Ptr = std::shared_ptr<ControlClient>;
  static Ptr Create(boost::asio::io_context& io, ClientOptions options,
                    std::function<void()> on_connected,
                    std::function<void(Envelope)> on_push);
  ControlClient(const ControlClient&) = delete;
  ControlClient& operator=(const ControlClient&) = delete;

  // Starts connecting (and reconnecting) in the background.
  void Start();
  // Stops reconnecting and closes the connection.
  void Shutdown() EXCLUDES(mu_);

  // Sends a request over the current connection; fails with UNAVAILABLE at
  // once when not connected. `done` runs exactly once.
  void Call(Envelope request, std::chrono::milliseconds timeout,
            Connection::CallDone done) EXCLUDES(mu_);
  // Blocking Call.
  StatusOr<Envelope> CallSync(Envelope request,
                              std::chrono::milliseconds timeout) EXCLUDES(mu_);
  // Waits until connected and authenticated, or the timeout; returns why not.
  Status WaitConnected(std::chrono::milliseconds timeout) EXCLUDES(mu_);

 private:
  ControlClient(boost::asio::io_context& io, ClientOptions options,
                std::function<void()> on_connected,
                std::function<void(Envelope)> on_push);
  void Connect() EXCLUDES(mu_);
  // The attempt's socket is connected (or failed with `ec`): starts the
  // handshake, or schedules the next attempt.
  void Connected(const std::shared_ptr<boost::asio::ip::tcp::socket>& socket,
                 const boost::system::error_code& ec) EXCLUDES(mu_);
  void ScheduleReconnect(const Status& why) EXCLUDES(mu_);

  boost::asio::io_context& io_;
  const ClientOptions options_;
  std::function<void()> on_connected_;
  std::function<void(Envelope)> on_push_;
  boost::asio::steady_timer retry_timer_;

  Mutex mu_;
  CondVar cv_;
  // Set once authenticated.
  Connection::Ptr connection_ GUARDED_BY(mu_);
  bool shut_down_ GUARDED_BY(mu_) = false;
  Status last_error_ GUARDED_BY(mu_) = UnavailableError("not connected yet");
  std::chrono::milliseconds backoff_ GUARDED_BY(mu_);
};

}  // namespace switchyard::control

#endif  // SWITCHYARD_TRANSPORT_CONTROL_CLIENT_H_
