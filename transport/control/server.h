// Accepts control connections and hands authenticated ones to handlers.
//
// Thread-safety: Listen/Shutdown from any thread; handlers run on each
// connection's strand. The server keeps its live connections; Shutdown closes
// them all.
#ifndef SWITCHYARD_TRANSPORT_CONTROL_SERVER_H_
#define SWITCHYARD_TRANSPORT_CONTROL_SERVER_H_

#include <boost/asio.hpp>
#include <memory>
#include <set>

#include "common/mutex.h"
#include "common/net_address.h"
#include "common/status.h"
#include "common/thread_annotations.h"
#include "transport/control/connection.h"

namespace switchyard::control {

class ControlServer {
 public:
  // `handlers.on_close` is wrapped so the server can forget the connection.
  ControlServer(boost::asio::io_context& io, ControlOptions options,
                Connection::Handlers handlers);
  // Destroy only after the io_context has stopped running.
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Binds and starts accepting. Port 0 picks a free port (see port()).
  Status Listen(const HostPort& address);
  uint16_t port() const { return port_; }
  void Shutdown() EXCLUDES(mu_);

 private:
  void DoAccept();

  boost::asio::io_context& io_;
  const ControlOptions options_;
  Connection::Handlers handlers_;
  boost::asio::ip::tcp::acceptor acceptor_;
  uint16_t port_ = 0;
  Mutex mu_;
  std::set<Connection::Ptr> connections_ GUARDED_BY(mu_);
  bool shut_down_ GUARDED_BY(mu_) = false;
};

}  // namespace switchyard::control

#endif  // SWITCHYARD_TRANSPORT_CONTROL_SERVER_H_
