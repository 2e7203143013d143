#include "transport/control/server.h"

#include <algorithm>

#include "transport/control/asio_status.h"
#include "transport/control/listen_endpoint.h"

namespace switchyard::control {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace {

constexpr std::chrono::milliseconds kMinAcceptBackoff{10};
constexpr std::chrono::milliseconds kMaxAcceptBackoff{1000};
constexpr std::chrono::seconds kAcceptErrorLogInterval{10};

// Errors after which accepting again at once would fail again: the process
// or the system is out of descriptors or memory.
bool IsResourceShortage(const boost::system::error_code& ec) {
  return ec == boost::system::errc::too_many_files_open ||
         ec == boost::system::errc::too_many_files_open_in_system ||
         ec == boost::system::errc::no_buffer_space ||
         ec == boost::system::errc::not_enough_memory;
}

}  // namespace

ControlServer::ControlServer(asio::io_context& io, ControlOptions options,
                             Connection::Handlers handlers,
                             AdmissionLimits limits)
    : io_(io),
      options_(std::move(options)),
      handlers_(std::move(handlers)),
      limits_(limits),
      acceptor_(io),
      accept_retry_timer_(io) {}

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
  acceptor_.async_accept(
      [this](const boost::system::error_code& ec, tcp::socket socket) {
        if (ec == asio::error::operation_aborted) return;
        if (ec) {
          OnAcceptError(ec);
          return;
        }
        accept_backoff_ = std::chrono::milliseconds(0);
        OnAccepted(std::move(socket));
        DoAccept();
      });
}

void ControlServer::OnAcceptError(const boost::system::error_code& ec) {
  const auto now = std::chrono::steady_clock::now();
  ++accept_errors_unlogged_;
  if (now - last_accept_error_log_ >= kAcceptErrorLogInterval) {
    LOG(WARNING) << "control: accept failed: " << ec.message() << " ("
                 << accept_errors_unlogged_
                 << " failed accepts since the last report; retrying with "
                    "backoff)";
    last_accept_error_log_ = now;
    accept_errors_unlogged_ = 0;
  }
  if (!IsResourceShortage(ec)) {
    // A per-connection error (the peer reset before accept): go on at once.
    DoAccept();
    return;
  }
  accept_backoff_ =
      std::clamp(accept_backoff_ * 2, kMinAcceptBackoff, kMaxAcceptBackoff);
  accept_retry_timer_.expires_after(accept_backoff_);
  accept_retry_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;
    {
      MutexLock lock(&mu_);
      if (shut_down_) return;
    }
    DoAccept();
  });
}

void ControlServer::OnAccepted(tcp::socket socket) {
  boost::system::error_code ec;
  const tcp::endpoint remote = socket.remote_endpoint(ec);
  if (ec) return;  // Already gone.
  socket.set_option(tcp::no_delay(true), ec);
  const std::string address = remote.address().to_string();
  Connection::Handlers handlers = handlers_;
  handlers.on_ready = [this,
                       user = handlers_.on_ready](const Connection::Ptr& conn) {
    {
      MutexLock lock(&mu_);
      ForgetHandshakeLocked(conn.get());
    }
    if (user) user(conn);
  };
  handlers.on_close = [this, user = handlers_.on_close](
                          const Connection::Ptr& conn, const Status& s) {
    {
      MutexLock lock(&mu_);
      ForgetHandshakeLocked(conn.get());
      connections_.erase(conn);
    }
    if (user) user(conn, s);
  };
  auto conn = Connection::Create(std::move(socket), Connection::Role::kServer,
                                 options_, std::move(handlers));
  Connection::Ptr evicted;
  {
    MutexLock lock(&mu_);
    if (shut_down_) return;
    connections_.insert(conn);
    evicted = AdmitLocked(conn, address);
  }
  if (evicted) {
    evicted->Close(ResourceExhaustedError(
        "too many unauthenticated connections; dropping the oldest handshake "
        "in progress"));
  }
  conn->Start();
}

Connection::Ptr ControlServer::AdmitLocked(const Connection::Ptr& conn,
                                           const std::string& address) {
  handshakes_.push_back({conn, address});
  const size_t from_address = ++handshakes_per_address_[address];
  auto victim = handshakes_.end();
  if (from_address > limits_.max_handshakes_per_address) {
    victim =
        std::find_if(handshakes_.begin(), handshakes_.end(),
                     [&](const Handshake& h) { return h.address == address; });
  } else if (handshakes_.size() > limits_.max_handshakes) {
    victim = handshakes_.begin();
  }
  if (victim == handshakes_.end()) return nullptr;
  Connection::Ptr evicted = victim->connection;
  ForgetHandshakeLocked(evicted.get());
  return evicted;
}

void ControlServer::ForgetHandshakeLocked(const Connection* conn) {
  for (auto it = handshakes_.begin(); it != handshakes_.end(); ++it) {
    if (it->connection.get() != conn) continue;
    auto count = handshakes_per_address_.find(it->address);
    if (--count->second == 0) handshakes_per_address_.erase(count);
    handshakes_.erase(it);
    return;
  }
}

size_t ControlServer::handshakes_in_progress() const {
  MutexLock lock(&mu_);
  return handshakes_.size();
}

void ControlServer::Shutdown() {
  std::set<Connection::Ptr> connections;
  {
    MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
    connections.swap(connections_);
    handshakes_.clear();
    handshakes_per_address_.clear();
  }
  asio::post(io_, [this] {
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    accept_retry_timer_.cancel();
  });
  for (const auto& conn : connections) {
    conn->Close(CancelledError("server shutting down"));
  }
}

}  // namespace switchyard::control
