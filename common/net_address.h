// host:port parsing shared by every process.
#ifndef SWITCHYARD_COMMON_NET_ADDRESS_H_
#define SWITCHYARD_COMMON_NET_ADDRESS_H_

#include <cstdint>
#include <string>

#include "common/status.h"

namespace switchyard {

struct HostPort {
  std::string host;
  uint16_t port = 0;
  std::string ToString() const { return host + ":" + std::to_string(port); }
};

// Parses "host:port" (port 0..65535). IPv6 hosts are written "[::1]:7470".
StatusOr<HostPort> ParseHostPort(const std::string& text);

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_NET_ADDRESS_H_
