// Where a TCP listener binds for a configured host:port.
#ifndef SWITCHYARD_TRANSPORT_CONTROL_LISTEN_ENDPOINT_H_
#define SWITCHYARD_TRANSPORT_CONTROL_LISTEN_ENDPOINT_H_

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "common/net_address.h"
#include "common/status.h"

namespace switchyard::control {

// An IP literal as it is; a host name (this host's name, as one config
// file for every process of a cluster gives it) resolved to its first
// address. INVALID_ARGUMENT, naming `what`, when it cannot be resolved.
StatusOr<boost::asio::ip::tcp::endpoint> ListenEndpoint(
    boost::asio::io_context& io, const HostPort& address,
    const std::string& what);

}  // namespace switchyard::control

#endif  // SWITCHYARD_TRANSPORT_CONTROL_LISTEN_ENDPOINT_H_
