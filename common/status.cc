#include "common/status.h"

#include <array>

namespace switchyard {
namespace {

constexpr std::array<std::string_view, 13> kCodeNames = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "FAILED_PRECONDITION",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
    "UNAUTHENTICATED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "DATA_LOSS",
    "INTERNAL",
    "CANCELLED",
};

}  // namespace

std::string_view StatusCodeName(StatusCode code) {
  return kCodeNames.at(static_cast<size_t>(code));
}

StatusCode StatusCodeFromName(std::string_view name) {
  for (size_t i = 0; i < kCodeNames.size(); ++i) {
    if (kCodeNames[i] == name) return static_cast<StatusCode>(i);
  }
  return StatusCode::kInternal;
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  return std::string(StatusCodeName(code_)) + ": " + message_;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  return Status(code_, std::string(context) + ": " + message_);
}

#define SWITCHYARD_DEFINE_ERROR(Name, Code)              \
  Status Name(std::string message) {                     \
    return Status(StatusCode::Code, std::move(message)); \
  }

SWITCHYARD_DEFINE_ERROR(InvalidArgumentError, kInvalidArgument)
SWITCHYARD_DEFINE_ERROR(NotFoundError, kNotFound)
SWITCHYARD_DEFINE_ERROR(AlreadyExistsError, kAlreadyExists)
SWITCHYARD_DEFINE_ERROR(FailedPreconditionError, kFailedPrecondition)
SWITCHYARD_DEFINE_ERROR(DeadlineExceededError, kDeadlineExceeded)
SWITCHYARD_DEFINE_ERROR(UnavailableError, kUnavailable)
SWITCHYARD_DEFINE_ERROR(UnauthenticatedError, kUnauthenticated)
SWITCHYARD_DEFINE_ERROR(ResourceExhaustedError, kResourceExhausted)
SWITCHYARD_DEFINE_ERROR(AbortedError, kAborted)
SWITCHYARD_DEFINE_ERROR(DataLossError, kDataLoss)
SWITCHYARD_DEFINE_ERROR(InternalError, kInternal)
SWITCHYARD_DEFINE_ERROR(CancelledError, kCancelled)

#undef SWITCHYARD_DEFINE_ERROR

}  // namespace switchyard
