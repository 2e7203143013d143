#include "transport/control/client.h"

#include <future>

#include "transport/control/asio_status.h"

namespace switchyard::control {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

ControlClient::Ptr ControlClient::Create(
    asio::io_context& io, ClientOptions options,
    std::function<void()> on_connected, std::function<void(Envelope)> on_push) {
  return Ptr(new ControlClient(io, std::move(options), std::move(on_connected),
                               std::move(on_push)));
}

ControlClient::ControlClient(asio::io_context& io, ClientOptions options,
                             std::function<void()> on_connected,
                             std::function<void(Envelope)> on_push)
    : io_(io),
      options_(std::move(options)),
      on_connected_(std::move(on_connected)),
      on_push_(std::move(on_push)),
      retry_timer_(io),
      backoff_(options_.min_backoff) {}

void ControlClient::Start() {
  asio::post(io_, [self = shared_from_this()] { self->Connect(); });
}

void ControlClient::Connect() {
  {
    MutexLock lock(&mu_);
    if (shut_down_) return;
  }
  auto socket = std::make_shared<tcp::socket>(io_);
  boost::system::error_code ec;
  const auto ip = asio::ip::make_address(options_.server.host, ec);
  if (!ec) {
    socket->async_connect(tcp::endpoint(ip, options_.server.port),
                          [self = shared_from_this(),
                           socket](const boost::system::error_code& ec) {
                            self->Connected(socket, ec);
                          });
    return;
  }
  // A host name (DNS, a Kubernetes service): resolved on every attempt, so
  // a coordinator that comes back at another address is found again. Each
  // address the name has is tried in turn.
  auto resolver = std::make_shared<tcp::resolver>(io_);
  resolver->async_resolve(
      options_.server.host, std::to_string(options_.server.port),
      [self = shared_from_this(), resolver, socket](
          const boost::system::error_code& ec,
          const tcp::resolver::results_type& endpoints) {
        if (ec) {
          self->ScheduleReconnect(ASIO_STATUS(
              ec,
              "resolve coordinator host '" + self->options_.server.host + "'"));
          return;
        }
        asio::async_connect(*socket, endpoints,
                            [self, socket](const boost::system::error_code& ec,
                                           const tcp::endpoint&) {
                              self->Connected(socket, ec);
                            });
      });
}

void ControlClient::Connected(const std::shared_ptr<tcp::socket>& socket,
                              const boost::system::error_code& ec) {
  if (ec) {
    ScheduleReconnect(
        ASIO_STATUS(ec, "connect to " + options_.server.ToString()));
    return;
  }
  socket->set_option(tcp::no_delay(true));
  Connection::Handlers handlers;
  std::weak_ptr<ControlClient> weak = shared_from_this();
  handlers.on_ready = [weak](const Connection::Ptr& conn) {
    auto self = weak.lock();
    if (!self) return;
    {
      MutexLock lock(&self->mu_);
      if (self->shut_down_) {
        conn->Close(CancelledError("client shut down"));
        return;
      }
      self->connection_ = conn;
      self->backoff_ = self->options_.min_backoff;
      self->last_error_ = OkStatus();
    }
    self->cv_.NotifyAll();
    VLOG(1) << "control: connected to " << conn->peer();
    if (self->on_connected_) self->on_connected_();
  };
  handlers.on_push = [weak](const Connection::Ptr&, Envelope e) {
    if (auto self = weak.lock(); self && self->on_push_) {
      self->on_push_(std::move(e));
    }
  };
  handlers.on_close = [weak](const Connection::Ptr& conn, const Status& s) {
    auto self = weak.lock();
    if (!self) return;
    {
      MutexLock lock(&self->mu_);
      if (self->connection_ == conn) self->connection_.reset();
    }
    self->ScheduleReconnect(s);
  };
  auto conn = Connection::Create(std::move(*socket), Connection::Role::kClient,
                                 options_.control, std::move(handlers));
  conn->Start();
}

void ControlClient::ScheduleReconnect(const Status& why) {
  std::chrono::milliseconds delay;
  {
    MutexLock lock(&mu_);
    if (shut_down_) return;
    last_error_ = why;
    delay = backoff_;
    backoff_ = std::min(backoff_ * 2, options_.max_backoff);
  }
  cv_.NotifyAll();
  VLOG(1) << "control: reconnecting in " << delay.count()
          << " ms: " << why.ToString();
  asio::post(io_, [self = shared_from_this(), delay] {
    self->retry_timer_.expires_after(delay);
    self->retry_timer_.async_wait([self](const boost::system::error_code& ec) {
      if (!ec) self->Connect();
    });
  });
}

void ControlClient::Shutdown() {
  Connection::Ptr conn;
  {
    MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
    conn = std::move(connection_);
    last_error_ = CancelledError("client shut down");
  }
  cv_.NotifyAll();
  asio::post(io_, [self = shared_from_this()] { self->retry_timer_.cancel(); });
  if (conn) conn->Close(CancelledError("client shut down"));
}

void ControlClient::Call(Envelope request, std::chrono::milliseconds timeout,
                         Connection::CallDone done) {
  Connection::Ptr conn;
  Status why;
  {
    MutexLock lock(&mu_);
    conn = connection_;
    why = last_error_;
  }
  if (!conn) {
    done(UnavailableError("not connected to " + options_.server.ToString() +
                          ": " + why.ToString()));
    return;
  }
  conn->Call(std::move(request), timeout, std::move(done));
}

StatusOr<Envelope> ControlClient::CallSync(Envelope request,
                                           std::chrono::milliseconds timeout) {
  auto promise = std::make_shared<std::promise<StatusOr<Envelope>>>();
  auto future = promise->get_future();
  Call(std::move(request), timeout,
       [promise](StatusOr<Envelope> r) { promise->set_value(std::move(r)); });
  return future.get();  // Call guarantees `done` runs by the deadline.
}

Status ControlClient::WaitConnected(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  MutexLock lock(&mu_);
  bool connected = true;  // Connected or shut down, before the deadline.
  while (connection_ == nullptr && !shut_down_) {
    if (!cv_.WaitUntil(&mu_, deadline)) {
      connected = connection_ != nullptr || shut_down_;
      break;
    }
  }
  if (connection_) return OkStatus();
  if (!connected) {
    return DeadlineExceededError(
        "not connected to " + options_.server.ToString() + " within " +
        std::to_string(timeout.count()) + " ms: " + last_error_.ToString());
  }
  return last_error_;
}

}  // namespace switchyard::control
