// Fuzzes what the data plane decodes from a peer before anything else
// looks at a message: the 80-byte WireHeader with the sizes that arrived
// (transport/wire_header.h: ValidateHeader, DescribeHeader) and the
// handshake's AuthMessage (transport/ucx/peer_auth.h: ParseAuthMessage).
//
// Input: the whole input is offered to ParseAuthMessage (any length). When
// it has at least 80 bytes they are the header; the bytes after it, as far
// as they go, give the header length that arrived (byte 80: 80 unless it
// is 255 or below 8, then that value), the payload bytes that arrived (8
// bytes) and the payload limit (8 bytes). Checks: an accepted header
// describes a payload that matches its shape and the limit.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "fuzz/fuzz_support.h"
#include "transport/ucx/peer_auth.h"
#include "transport/wire_header.h"

namespace {

uint64_t Take64(const uint8_t* data, size_t size, size_t at, uint64_t dflt) {
  if (at + 8 > size) return dflt;
  uint64_t v;
  std::memcpy(&v, data + at, 8);
  return v;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  switchyard::fuzz::QuietLogging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace switchyard::transport;
  {
    auto message = ParseAuthMessage(data, size);
    if (message.ok()) {
      FUZZ_CHECK(size == sizeof(AuthMessage));
      FUZZ_CHECK(message->step >= 1 && message->step <= 5);
      FUZZ_CHECK(message->nonce_bytes().size() == kAuthFieldBytes);
    }
  }
  if (size < sizeof(WireHeader)) return 0;
  WireHeader header;
  std::memcpy(&header, data, sizeof(header));
  size_t header_bytes = sizeof(WireHeader);
  if (size > 80 && (data[80] == 255 || data[80] < 8)) header_bytes = data[80];
  const uint64_t payload_bytes = Take64(data, size, 81, header.payload_bytes);
  const uint64_t max_payload_bytes = Take64(data, size, 89, uint64_t{1} << 30);
  const auto status =
      ValidateHeader(header, header_bytes, payload_bytes, max_payload_bytes);
  const std::string description = DescribeHeader(header);
  FUZZ_CHECK(!description.empty());
  if (!status.ok()) {
    FUZZ_CHECK(!status.message().empty());
    return 0;
  }
  FUZZ_CHECK(header.payload_bytes == payload_bytes);
  FUZZ_CHECK(payload_bytes <= max_payload_bytes);
  if (header.dtype != kNoDType) {
    const auto dtype = static_cast<switchyard::DType>(header.dtype);
    FUZZ_CHECK(header.rows >= 0 && header.cols >= 0);
    // The shape a receiver allocates for the payload.
    const unsigned __int128 bytes =
        static_cast<unsigned __int128>(header.rows) *
        static_cast<uint64_t>(header.cols) * switchyard::DTypeBytes(dtype);
    FUZZ_CHECK(bytes == payload_bytes);
  }
  return 0;
}
