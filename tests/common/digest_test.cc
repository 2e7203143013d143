// Xxh3, Xxh3Stream and Digest run XXH3's vectorised code (chosen at run
// time); their hashes must be XXH3's, as the portable code computes them:
// checkpoints and logged digests from before, and from other machines,
// must still match.
#include "common/digest.h"

#include <gtest/gtest.h>
#include <xxhash.h>  // The portable entry points only: no dispatch here.

#include <cstdint>
#include <random>
#include <vector>

namespace switchyard {
namespace {

std::vector<uint8_t> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> bytes(n);
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  return bytes;
}

TEST(Xxh3Test, KnownAnswerForNoBytes) {
  // XXH3-64 of the empty input, seed 0 (xxHash's own test vectors).
  EXPECT_EQ(Xxh3(nullptr, 0), 0x2D06800538D394C2ull);
  Xxh3Stream stream;
  EXPECT_EQ(stream.value(), 0x2D06800538D394C2ull);
}

TEST(Xxh3Test, EqualsThePortableCodeAtEverySize) {
  // Short inputs, both sides of XXH3's 128- and 240-byte boundaries, and
  // long ones (the vectorised loop) up to several stripes blocks.
  for (size_t n : {size_t{1}, size_t{3}, size_t{16}, size_t{17}, size_t{128},
                   size_t{129}, size_t{240}, size_t{241}, size_t{1000},
                   size_t{1024}, size_t{65536 + 7}, size_t{(1 << 20) + 13}}) {
    const std::vector<uint8_t> bytes = RandomBytes(n, static_cast<uint32_t>(n));
    const uint64_t portable = XXH3_64bits(bytes.data(), n);
    EXPECT_EQ(Xxh3(bytes.data(), n), portable) << n;
    // Streamed in uneven pieces.
    Xxh3Stream stream;
    for (size_t at = 0, piece = 1; at < n; at += piece, piece = piece * 3 + 1) {
      stream.Update(bytes.data() + at, std::min(piece, n - at));
    }
    EXPECT_EQ(stream.value(), portable) << n;
    stream.Reset();
    stream.Update(bytes.data(), n);
    EXPECT_EQ(stream.value(), portable) << n;
  }
}

TEST(DigestTest, AddEqualsHeaderThenBytesInPieces) {
  Tensor t = Tensor::Zeros(DType::kF32, {256, 1024}).value();
  const std::vector<uint8_t> bytes = RandomBytes(t.num_bytes(), 5);
  std::memcpy(t.data(), bytes.data(), bytes.size());
  Digest whole;
  whole.Add("w1", t);
  Digest pieces;
  pieces.AddHeader("w1", t);
  for (size_t at = 0; at < bytes.size(); at += 100000) {
    pieces.AddBytes(bytes.data() + at,
                    std::min<size_t>(100000, bytes.size() - at));
  }
  EXPECT_EQ(whole.hex(), pieces.hex());
  Digest renamed;
  renamed.Add("w2", t);
  EXPECT_NE(whole.hex(), renamed.hex());
}

}  // namespace
}  // namespace switchyard
