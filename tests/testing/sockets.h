// Test helper: raw TCP sockets to a loopback port, for playing hostile or
// broken peers. Header-only.
#ifndef SWITCHYARD_TESTS_TESTING_SOCKETS_H_
#define SWITCHYARD_TESTS_TESTING_SOCKETS_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>

namespace switchyard::testing {

// A TCP socket connected to 127.0.0.1:`port`; sets *connected. The caller
// closes the descriptor.
inline int ConnectToLoopback(uint16_t port, bool* connected) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  *connected =
      ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  return fd;
}

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_TESTING_SOCKETS_H_
