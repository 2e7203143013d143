#include "transport/control/server.h"

#include "transport/control/asio_status.h"
#include "transport/control/listen_endpoint.h"

namespace switchyard::control {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

ControlServer::ControlServer(asio::io_context& io, ControlOptions options,
                             Connection::Handlers handlers)
    : io_(io),
      options_(std::move(options)),
      handlers_(std::move(handlers)),
      acceptor_(io) {}

ControlServer::~ControlServer() {
  boost::system::error_code ignored;
  acceptor_.close(ignored);
}

Status ControlServer::Listen(const HostPort& address) {
  ASSIGN_OR_RETURN(const tcp::endpoint endpoint,
                   ListenEndpoint(io_, address, "listen address"));
  boost::system::error_code ec;
  acceptor_.open(endpoint.protocol(), ec);
  if (ec) return ASIO_STATUS(ec, "open listener");
  acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
  acceptor_.bind(endpoint, ec);
  if (ec) return ASIO_STATUS(ec, "bind " + address.ToString());
  acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return ASIO_STATUS(ec, "listen on " + address.ToString());
  port_ = acceptor_.local_endpoint().port();
  DoAccept();
  return OkStatus();
}

void ControlServer::DoAccept() {
  acceptor_.async_accept([this](const boost::system::error_code& ec,
                                tcp::socket socket) {
    if (ec == asio::error::operation_aborted) return;
    if (ec) {
      LOG(WARNING) << "control: accept failed: " << ec.message();
    } else {
      socket.set_option(tcp::no_delay(true));
      Connection::Handlers handlers = handlers_;
      handlers.on_close = [this, user = handlers_.on_close](
                              const Connection::Ptr& conn, const Status& s) {
        {
          MutexLock lock(&mu_);
          connections_.erase(conn);
        }
        if (user) user(conn, s);
      };
      auto conn =
          Connection::Create(std::move(socket), Connection::Role::kServer,
                             options_, std::move(handlers));
      {
        MutexLock lock(&mu_);
        if (shut_down_) return;
        connections_.insert(conn);
      }
      conn->Start();
    }
    DoAccept();
  });
}

void ControlServer::Shutdown() {
  std::set<Connection::Ptr> connections;
  {
    MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
    connections.swap(connections_);
  }
  asio::post(io_, [this] {
    boost::system::error_code ignored;
    acceptor_.close(ignored);
  });
  for (const auto& conn : connections) {
    conn->Close(CancelledError("server shutting down"));
  }
}

}  // namespace switchyard::control
