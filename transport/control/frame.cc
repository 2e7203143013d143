#include "transport/control/frame.h"

#include <cstring>

namespace switchyard::control {

std::string EncodeFrame(const Envelope& envelope) {
  const size_t size = envelope.ByteSizeLong();
  std::string frame(kFrameHeaderBytes + size, '\0');
  std::memcpy(frame.data(), kFrameMagic, 4);
  frame[4] = static_cast<char>((size >> 24) & 0xff);
  frame[5] = static_cast<char>((size >> 16) & 0xff);
  frame[6] = static_cast<char>((size >> 8) & 0xff);
  frame[7] = static_cast<char>(size & 0xff);
  envelope.SerializeWithCachedSizesToArray(
      reinterpret_cast<uint8_t*>(frame.data() + kFrameHeaderBytes));
  return frame;
}

void FrameDecoder::Feed(const char* data, size_t size) {
  // Compact once the consumed prefix dominates, so the buffer stays bounded
  // by one frame plus one read.
  if (offset_ > 0 && offset_ * 2 >= buffer_.size()) {
    buffer_.erase(0, offset_);
    offset_ = 0;
  }
  buffer_.append(data, size);
}

StatusOr<bool> FrameDecoder::Next(Envelope* out) {
  const size_t available = buffer_.size() - offset_;
  if (available < kFrameHeaderBytes) return false;
  const auto* header =
      reinterpret_cast<const unsigned char*>(buffer_.data() + offset_);
  if (std::memcmp(header, kFrameMagic, 4) != 0) {
    return DataLossError("bad frame magic (not a switchyard control stream)");
  }
  const size_t length = (size_t{header[4]} << 24) | (size_t{header[5]} << 16) |
                        (size_t{header[6]} << 8) | size_t{header[7]};
  if (length > max_frame_bytes_) {
    return ResourceExhaustedError("frame of " + std::to_string(length) +
                                  " bytes exceeds the maximum of " +
                                  std::to_string(max_frame_bytes_));
  }
  if (available < kFrameHeaderBytes + length) return false;
  if (!out->ParseFromArray(buffer_.data() + offset_ + kFrameHeaderBytes,
                           static_cast<int>(length))) {
    return DataLossError("malformed frame: payload of " +
                         std::to_string(length) + " bytes is not an Envelope");
  }
  offset_ += kFrameHeaderBytes + length;
  return true;
}

}  // namespace switchyard::control
