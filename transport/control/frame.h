// Control-plane framing (docs/protocol.md).
//
// A frame is an 8-byte header, the magic "SYC1" then the payload length as a
// big-endian uint32, followed by one serialized Envelope. Frames longer than
// the configured maximum are refused from their header alone, before any of
// the payload is buffered.
#ifndef SWITCHYARD_TRANSPORT_CONTROL_FRAME_H_
#define SWITCHYARD_TRANSPORT_CONTROL_FRAME_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"
#include "control.pb.h"

namespace switchyard::control {

constexpr size_t kFrameHeaderBytes = 8;
constexpr char kFrameMagic[4] = {'S', 'Y', 'C', '1'};

// Serializes `envelope` into one frame.
std::string EncodeFrame(const Envelope& envelope);

// Incremental decoder for a byte stream of frames. Not thread-safe.
class FrameDecoder {
 public:
  explicit FrameDecoder(size_t max_frame_bytes)
      : max_frame_bytes_(max_frame_bytes) {}

  // Appends received bytes.
  void Feed(const char* data, size_t size);

  // Decodes the next complete frame into *out. Returns false when more bytes
  // are needed, an error for a bad magic, an oversized length or a payload
  // that is not an Envelope. After an error the stream is unusable.
  StatusOr<bool> Next(Envelope* out);

  // Changes the limit for frames not yet decoded (raised once a peer has
  // authenticated).
  void set_max_frame_bytes(size_t max_frame_bytes) {
    max_frame_bytes_ = max_frame_bytes;
  }

  // Bytes of a frame started but not completed (for "truncated" reports).
  size_t buffered_bytes() const { return buffer_.size() - offset_; }

 private:
  size_t max_frame_bytes_;
  std::string buffer_;
  size_t offset_ = 0;
};

}  // namespace switchyard::control

#endif  // SWITCHYARD_TRANSPORT_CONTROL_FRAME_H_
