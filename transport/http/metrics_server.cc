#include "transport/http/metrics_server.h"

#include <boost/asio.hpp>

#include "common/metrics.h"
#include "common/net_address.h"
#include "common/thread_name.h"
#include "transport/control/listen_endpoint.h"

namespace switchyard::transport {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

struct MetricsServer::Impl {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  std::string address;

  void Accept() {
    acceptor.async_accept(
        [this](const boost::system::error_code& ec, tcp::socket socket) {
          if (ec) return;  // Closed.
          Serve(std::make_shared<tcp::socket>(std::move(socket)));
          Accept();
        });
  }

  void Serve(std::shared_ptr<tcp::socket> socket) {
    auto buffer = std::make_shared<asio::streambuf>(8192);
    auto timer = std::make_shared<asio::steady_timer>(io);
    timer->expires_after(std::chrono::seconds(5));
    timer->async_wait([socket](const boost::system::error_code& ec) {
      if (!ec) socket->close();  // Too slow: give up on it.
    });
    asio::async_read_until(
        *socket, *buffer, "\r\n\r\n",
        [socket, buffer, timer](const boost::system::error_code& ec, size_t) {
          timer->cancel();
          if (ec) return;  // Closed, too long, or timed out.
          std::istream in(buffer.get());
          std::string method, path;
          in >> method >> path;
          std::string status = "200 OK", body;
          if (method != "GET") {
            status = "405 Method Not Allowed";
            body = "only GET\n";
          } else if (path != "/metrics") {
            status = "404 Not Found";
            body = "try /metrics\n";
          } else {
            body = MetricsRegistry::Global().RenderText();
          }
          auto reply = std::make_shared<std::string>(
              "HTTP/1.1 " + status +
              "\r\nContent-Type: text/plain; version=0.0.4\r\n"
              "Content-Length: " +
              std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" +
              body);
          asio::async_write(*socket, asio::buffer(*reply),
                            [socket, reply](const boost::system::error_code&,
                                            size_t) { socket->close(); });
        });
  }
};

MetricsServer::MetricsServer() : impl_(std::make_unique<Impl>()) {}

MetricsServer::~MetricsServer() { Shutdown(); }

Status MetricsServer::Start(const std::string& address) {
  ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(address));
  ASSIGN_OR_RETURN(const tcp::endpoint endpoint,
                   control::ListenEndpoint(impl_->io, hp, "metrics address"));
  boost::system::error_code ec;
  impl_->acceptor.open(endpoint.protocol(), ec);
  if (!ec) impl_->acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) impl_->acceptor.bind(endpoint, ec);
  if (!ec) impl_->acceptor.listen(64, ec);
  if (ec) {
    return UnavailableError("metrics endpoint on " + address + ": " +
                            ec.message());
  }
  hp.port = impl_->acceptor.local_endpoint().port();
  impl_->address = hp.ToString();
  impl_->Accept();
  thread_ = StartNamedThread("sy-metrics", [this] { impl_->io.run(); });
  LOG(INFO) << "metrics: serving http://" << impl_->address << "/metrics";
  return OkStatus();
}

void MetricsServer::Shutdown() {
  if (!thread_.joinable()) return;
  asio::post(impl_->io, [this] {
    boost::system::error_code ec;
    impl_->acceptor.close(ec);
    impl_->io.stop();
  });
  thread_.join();
}

std::string MetricsServer::address() const { return impl_->address; }

}  // namespace switchyard::transport
