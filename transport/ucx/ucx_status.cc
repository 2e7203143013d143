#include "transport/ucx/ucx_status.h"

namespace switchyard::transport {

Status UcxStatus(ucs_status_t s, const std::string& what, const char* file,
                 int line) {
  if (s == UCS_OK) return OkStatus();
  const std::string msg = what + ": " + ucs_status_string(s) + " [" + file +
                          ":" + std::to_string(line) + "]";
  switch (s) {
    case UCS_ERR_TIMED_OUT:
      return DeadlineExceededError(msg);
    case UCS_ERR_CANCELED:
      return CancelledError(msg);
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_EXCEEDS_LIMIT:
      return ResourceExhaustedError(msg);
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return InvalidArgumentError(msg);
    default:
      return UnavailableError(msg);
  }
}

}  // namespace switchyard::transport
