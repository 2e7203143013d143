#include "transport/control/frame.h"

#include <gtest/gtest.h>

namespace switchyard::control {
namespace {

Envelope Sample(uint64_t id) {
  Envelope e;
  e.set_request_id(id);
  e.mutable_heartbeat()->set_name("worker-" + std::to_string(id));
  e.mutable_heartbeat()->set_incarnation(id * 10);
  return e;
}

TEST(FrameTest, RoundTripsWholeAndSplit) {
  std::string stream;
  for (uint64_t i = 1; i <= 3; ++i) stream += EncodeFrame(Sample(i));
  // Whole stream at once.
  {
    FrameDecoder decoder(1 << 20);
    decoder.Feed(stream.data(), stream.size());
    for (uint64_t i = 1; i <= 3; ++i) {
      Envelope e;
      auto r = decoder.Next(&e);
      ASSERT_TRUE(r.ok() && *r);
      EXPECT_EQ(e.heartbeat().name(), "worker-" + std::to_string(i));
    }
    Envelope e;
    EXPECT_FALSE(*decoder.Next(&e));
    EXPECT_EQ(decoder.buffered_bytes(), 0u);
  }
  // One byte at a time: partial headers and partial payloads.
  {
    FrameDecoder decoder(1 << 20);
    int decoded = 0;
    for (char c : stream) {
      decoder.Feed(&c, 1);
      Envelope e;
      auto r = decoder.Next(&e);
      ASSERT_TRUE(r.ok());
      if (*r) {
        ++decoded;
        EXPECT_EQ(e.request_id(), static_cast<uint64_t>(decoded));
      }
    }
    EXPECT_EQ(decoded, 3);
  }
}

TEST(FrameTest, OversizedIsRefusedFromTheHeader) {
  Envelope big;
  big.mutable_error()->set_message(std::string(5000, 'x'));
  const std::string frame = EncodeFrame(big);
  FrameDecoder decoder(4096);
  decoder.Feed(frame.data(), kFrameHeaderBytes);  // Header only.
  Envelope e;
  auto r = decoder.Next(&e);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(r.status().message().find("exceeds the maximum of 4096"),
            std::string::npos);
}

TEST(FrameTest, GarbageAndMalformedPayloads) {
  {
    FrameDecoder decoder(1 << 20);
    const std::string garbage = "GET / HTTP/1.1\r\n\r\n";
    decoder.Feed(garbage.data(), garbage.size());
    Envelope e;
    auto r = decoder.Next(&e);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  }
  {
    // A valid header around bytes that are not an Envelope.
    std::string frame = "SYC1";
    frame += std::string("\0\0\0\4", 4);
    frame += "\xff\xff\xff\xff";
    FrameDecoder decoder(1 << 20);
    decoder.Feed(frame.data(), frame.size());
    Envelope e;
    auto r = decoder.Next(&e);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("not an Envelope"), std::string::npos);
  }
}

TEST(FrameTest, TruncatedFrameIsReportedAsBuffered) {
  const std::string frame = EncodeFrame(Sample(7));
  FrameDecoder decoder(1 << 20);
  decoder.Feed(frame.data(), frame.size() - 3);
  Envelope e;
  EXPECT_FALSE(*decoder.Next(&e));
  EXPECT_EQ(decoder.buffered_bytes(), frame.size() - 3);
}

}  // namespace
}  // namespace switchyard::control
