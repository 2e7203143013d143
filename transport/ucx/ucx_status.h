// UcxStatus: the one place where UCX's ucs_status_t becomes a Status
// (STYLE.md 2), with the call site's file:line in the message.
#ifndef SWITCHYARD_TRANSPORT_UCX_UCX_STATUS_H_
#define SWITCHYARD_TRANSPORT_UCX_UCX_STATUS_H_

#include <ucs/type/status.h>

#include <string>

#include "common/status.h"

namespace switchyard::transport {

// OK for UCS_OK; otherwise "what: UCX's text [file:line]" with the nearest
// code (timeouts DEADLINE_EXCEEDED, cancellation CANCELLED, memory and
// limits RESOURCE_EXHAUSTED, bad parameters INVALID_ARGUMENT, the rest
// UNAVAILABLE).
Status UcxStatus(ucs_status_t s, const std::string& what, const char* file,
                 int line);

}  // namespace switchyard::transport

#define UCX_STATUS(s, what) \
  ::switchyard::transport::UcxStatus((s), (what), __FILE__, __LINE__)

#endif  // SWITCHYARD_TRANSPORT_UCX_UCX_STATUS_H_
