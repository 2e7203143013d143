#include "transport/control/listen_endpoint.h"

namespace switchyard::control {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

StatusOr<tcp::endpoint> ListenEndpoint(asio::io_context& io,
                                       const HostPort& address,
                                       const std::string& what) {
  boost::system::error_code ec;
  const auto ip = asio::ip::make_address(address.host, ec);
  if (!ec) return tcp::endpoint(ip, address.port);
  tcp::resolver resolver(io);
  const auto results =
      resolver.resolve(address.host, std::to_string(address.port),
                       tcp::resolver::numeric_service, ec);
  if (ec || results.empty()) {
    return InvalidArgumentError(what + " " + address.ToString() +
                                ": cannot resolve host '" + address.host + "'" +
                                (ec ? ": " + ec.message() : ""));
  }
  return results.begin()->endpoint();
}

}  // namespace switchyard::control
