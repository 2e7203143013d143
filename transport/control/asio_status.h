// The one place where Boost.Asio / Boost.System error codes become Status.
#ifndef SWITCHYARD_TRANSPORT_CONTROL_ASIO_STATUS_H_
#define SWITCHYARD_TRANSPORT_CONTROL_ASIO_STATUS_H_

#include <boost/asio/error.hpp>
#include <boost/system/error_code.hpp>
#include <string>

#include "common/status.h"

namespace switchyard::control {

inline Status AsioStatus(const boost::system::error_code& ec,
                         const std::string& what, const char* file, int line) {
  if (!ec) return OkStatus();
  const std::string msg = what + ": " + ec.message() + " [" + file + ":" +
                          std::to_string(line) + "]";
  if (ec == boost::asio::error::operation_aborted) return CancelledError(msg);
  if (ec == boost::asio::error::timed_out) return DeadlineExceededError(msg);
  return UnavailableError(msg);
}

}  // namespace switchyard::control

#define ASIO_STATUS(ec, what) \
  ::switchyard::control::AsioStatus((ec), (what), __FILE__, __LINE__)

#endif  // SWITCHYARD_TRANSPORT_CONTROL_ASIO_STATUS_H_
