// The Prometheus endpoint over real HTTP on loopback.
#include "transport/http/metrics_server.h"

#include <gtest/gtest.h>

#include <boost/asio.hpp>
#include <string>

#include "common/metrics.h"
#include "common/net_address.h"

namespace switchyard::transport {
namespace {

namespace asio = boost::asio;

// Sends `request` and returns everything the server answers.
std::string Fetch(const std::string& address, const std::string& request) {
  const HostPort hp = ParseHostPort(address).value();
  asio::io_context io;
  asio::ip::tcp::socket socket(io);
  socket.connect({asio::ip::make_address(hp.host), hp.port});
  asio::write(socket, asio::buffer(request));
  socket.shutdown(asio::ip::tcp::socket::shutdown_send);
  std::string out;
  boost::system::error_code ec;
  char buf[4096];
  for (size_t n; (n = socket.read_some(asio::buffer(buf), ec)) > 0 || !ec;) {
    out.append(buf, n);
    if (ec) break;
  }
  return out;
}

TEST(MetricsServerTest, ServesTheRegistryAndRefusesTheRest) {
  MetricsRegistry::Global()
      .GetCounter("switchyard_metrics_server_test_total")
      ->Increment(7);
  MetricsServer server;
  ASSERT_TRUE(server.Start("127.0.0.1:0").ok());
  const std::string ok =
      Fetch(server.address(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(ok.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << ok;
  EXPECT_NE(ok.find("switchyard_metrics_server_test_total 7"),
            std::string::npos)
      << ok;
  EXPECT_EQ(Fetch(server.address(), "GET / HTTP/1.1\r\n\r\n")
                .rfind("HTTP/1.1 404", 0),
            0u);
  EXPECT_EQ(Fetch(server.address(), "POST /metrics HTTP/1.1\r\n\r\n")
                .rfind("HTTP/1.1 405", 0),
            0u);
  // Garbage without a blank line, then the peer stops sending: no answer,
  // and the server keeps serving.
  EXPECT_EQ(Fetch(server.address(), "\x01\x02garbage"), "");
  EXPECT_NE(
      Fetch(server.address(), "GET /metrics HTTP/1.0\r\n\r\n").find("200 OK"),
      std::string::npos);
  server.Shutdown();
  MetricsServer taken;
  EXPECT_FALSE(taken.Start("256.0.0.1:0").ok());
}

}  // namespace
}  // namespace switchyard::transport
