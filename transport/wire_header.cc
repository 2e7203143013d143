#include "transport/wire_header.h"

#include <limits>

namespace switchyard::transport {

Status ValidateHeader(const WireHeader& h, size_t received_header_bytes,
                      size_t received_payload_bytes, size_t max_payload_bytes) {
  if (received_header_bytes != sizeof(WireHeader)) {
    return InvalidArgumentError(
        "header of " + std::to_string(received_header_bytes) +
        " bytes; expected " + std::to_string(sizeof(WireHeader)));
  }
  if (h.magic != kWireMagic) return InvalidArgumentError("bad header magic");
  if (h.version != kWireVersion) {
    return FailedPreconditionError("wire version " + std::to_string(h.version) +
                                   " (this side speaks " +
                                   std::to_string(kWireVersion) + ")");
  }
  if (h.kind == 0 || h.kind > static_cast<uint8_t>(MessageKind::kMaxKind)) {
    return InvalidArgumentError("unknown message kind " +
                                std::to_string(h.kind));
  }
  if (h.payload_bytes != received_payload_bytes) {
    return InvalidArgumentError(
        "header announces " + std::to_string(h.payload_bytes) +
        " payload bytes but " + std::to_string(received_payload_bytes) +
        " arrived");
  }
  if (h.payload_bytes > max_payload_bytes) {
    return ResourceExhaustedError(
        "payload of " + std::to_string(h.payload_bytes) +
        " bytes exceeds the maximum of " + std::to_string(max_payload_bytes));
  }
  if (h.dtype == kNoDType) {
    if (h.rows != 0 || h.cols != 0) {
      return InvalidArgumentError("a shape without a dtype");
    }
    if (h.payload_bytes != 0 && h.status_code == 0) {
      return InvalidArgumentError("payload without a dtype");
    }
    return OkStatus();
  }
  if (h.dtype != static_cast<uint8_t>(DType::kF32) &&
      h.dtype != static_cast<uint8_t>(DType::kBF16)) {
    return InvalidArgumentError("unknown dtype " + std::to_string(h.dtype));
  }
  if (h.rows < 0 || h.cols < 0 ||
      (h.cols > 0 &&
       h.rows > std::numeric_limits<int64_t>::max() / 8 / h.cols)) {
    return InvalidArgumentError("bad shape [" + std::to_string(h.rows) + "," +
                                std::to_string(h.cols) + "]");
  }
  const uint64_t expected = static_cast<uint64_t>(h.rows) * h.cols *
                            DTypeBytes(static_cast<DType>(h.dtype));
  if (expected != h.payload_bytes) {
    return InvalidArgumentError(
        "shape [" + std::to_string(h.rows) + "," + std::to_string(h.cols) +
        "] of " + std::string(DTypeName(static_cast<DType>(h.dtype))) +
        " needs " + std::to_string(expected) + " bytes, header says " +
        std::to_string(h.payload_bytes));
  }
  return OkStatus();
}

std::string DescribeHeader(const WireHeader& h) {
  static const char* kNames[] = {"?",
                                 "forward",
                                 "backward",
                                 "step-done",
                                 "dense-pull",
                                 "dense-push",
                                 "echo",
                                 "eval",
                                 "ckpt-fetch",
                                 "handover",
                                 "probe",
                                 "replica-weights",
                                 "replica-forward",
                                 "replica-backward",
                                 "replica-share",
                                 "replica-drop"};
  const char* kind = h.kind <= static_cast<uint8_t>(MessageKind::kMaxKind)
                         ? kNames[h.kind]
                         : "?";
  return std::string(kind) + " step " + std::to_string(h.step) + " mb " +
         std::to_string(h.micro_batch) + " L" + std::to_string(h.layer) + ".E" +
         std::to_string(h.expert) + ".S" + std::to_string(h.shard) + " rank " +
         std::to_string(h.trainer_rank) + " epoch " + std::to_string(h.epoch);
}

}  // namespace switchyard::transport
