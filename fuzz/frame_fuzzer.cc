// Fuzzes the control plane's frame decoder (transport/control/frame.h) as a
// connection drives it: arbitrary bytes, fed in arbitrary splits, each
// split followed by decoding until the decoder wants more bytes or fails.
//
// Input: byte 0 picks the maximum frame size (small: 16..4096 bytes, as
// before authentication), byte 1 seeds the split sizes, the rest is the
// stream. Checks: the decoder never holds more than one frame's worth of
// undecoded bytes, an error ends the stream (as Connection does), and every
// decoded Envelope encodes to a frame that decodes to the same message.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz/fuzz_support.h"
#include "transport/control/frame.h"

namespace switchyard::control {
namespace {

void CheckRoundTrip(const Envelope& envelope) {
  const std::string frame = EncodeFrame(envelope);
  FrameDecoder decoder(frame.size());
  decoder.Feed(frame.data(), frame.size());
  Envelope again;
  auto next = decoder.Next(&again);
  FUZZ_CHECK(next.ok() && *next);
  FUZZ_CHECK(again.SerializeAsString() == envelope.SerializeAsString());
  FUZZ_CHECK(decoder.buffered_bytes() == 0);
}

}  // namespace
}  // namespace switchyard::control

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  switchyard::fuzz::QuietLogging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace switchyard::control;
  if (size < 2) return 0;
  size_t max_frame_bytes = 16 + size_t{data[0]} * 16;
  uint32_t split_state = data[1];
  const char* stream = reinterpret_cast<const char*>(data + 2);
  size_t left = size - 2;
  FrameDecoder decoder(max_frame_bytes);
  int decoded = 0;
  while (left > 0) {
    // Split sizes from the input's seed (a linear congruential sequence):
    // 1..64 bytes, the whole remainder now and then.
    split_state = split_state * 1103515245u + 12345u;
    size_t n =
        (split_state >> 16) % 65 == 0 ? left : 1 + (split_state >> 16) % 64;
    n = std::min(n, left);
    decoder.Feed(stream, n);
    stream += n;
    left -= n;
    while (true) {
      Envelope envelope;
      auto next = decoder.Next(&envelope);
      if (!next.ok()) return 0;  // The connection closes.
      if (!*next) break;
      CheckRoundTrip(envelope);
      // After the first frame (a handshake), the limit is raised the way
      // an authenticated connection's is.
      if (++decoded == 1) {
        max_frame_bytes *= 4;
        decoder.set_max_frame_bytes(max_frame_bytes);
      }
    }
    FUZZ_CHECK(decoder.buffered_bytes() < kFrameHeaderBytes + max_frame_bytes);
  }
  return 0;
}
