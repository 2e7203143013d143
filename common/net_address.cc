#include "common/net_address.h"

#include <cstdlib>

namespace switchyard {

StatusOr<HostPort> ParseHostPort(const std::string& text) {
  const size_t colon = text.rfind(':');
  auto bad = [&] {
    return InvalidArgumentError("address '" + text +
                                "' is not host:port (port 0..65535)");
  };
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) {
    return bad();
  }
  std::string host = text.substr(0, colon);
  if (host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  const std::string port_text = text.substr(colon + 1);
  char* end = nullptr;
  const long port = std::strtol(port_text.c_str(), &end, 10);
  if (*end != '\0' || port < 0 || port > 65535 || host.empty()) return bad();
  return HostPort{host, static_cast<uint16_t>(port)};
}

}  // namespace switchyard
