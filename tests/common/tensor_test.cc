#include "common/tensor.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common/ids.h"

namespace switchyard {
namespace {

TEST(TensorTest, ZerosAreAlignedAndZero) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    auto t = Tensor::Zeros(dtype, {3, 5});
    ASSERT_TRUE(t.ok());
    EXPECT_EQ(t->num_elements(), 15);
    EXPECT_EQ(t->num_bytes(), 15 * DTypeBytes(dtype));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t->data()) % kTensorAlignmentBytes,
              0u);
    const auto* bytes = static_cast<const uint8_t*>(t->data());
    for (size_t i = 0; i < t->num_bytes(); ++i) ASSERT_EQ(bytes[i], 0);
  }
  auto empty = Tensor::Zeros(DType::kF32, {0, 4});
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->num_elements(), 0);
}

TEST(TensorTest, RejectsBadShapes) {
  EXPECT_FALSE(Tensor::Zeros(DType::kF32, {-1, 4}).ok());
  const int64_t big = std::numeric_limits<int64_t>::max() / 2;
  EXPECT_FALSE(Tensor::Zeros(DType::kF32, {big, big}).ok());
  // The limit is 2^63 / 8 elements (every dtype's bytes fit an int64), met
  // exactly, passed by one, and passed only by the product of dimensions
  // that each fit; a zero dimension makes any other size empty.
  const int64_t limit = std::numeric_limits<int64_t>::max() / 8;
  EXPECT_EQ(Tensor::BytesFor(DType::kBF16, {limit}).value(),
            static_cast<size_t>(limit) * 2);
  EXPECT_FALSE(Tensor::BytesFor(DType::kF32, {limit + 1}).ok());
  EXPECT_FALSE(Tensor::BytesFor(DType::kF32, {int64_t{1} << 30, 1 << 30}).ok());
  EXPECT_TRUE(Tensor::BytesFor(DType::kF32, {int64_t{1} << 29, 1 << 30}).ok());
  EXPECT_EQ(Tensor::BytesFor(DType::kF32, {0, big, big}).value(), 0u);
  EXPECT_FALSE(Tensor::BytesFor(DType::kF32, {big, big, 0}).ok());
  EXPECT_EQ(Tensor::BytesFor(DType::kF32, {2, 3, 4}).value(), 96u);
}

TEST(TensorTest, SliceAndReshapeShareStorage) {
  Tensor t = Tensor::Zeros(DType::kF32, {4, 3}).value();
  for (int i = 0; i < 12; ++i) t.f32()[i] = static_cast<float>(i);
  Tensor rows = t.Slice(1, 3).value();
  EXPECT_EQ(rows.shape(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(rows.f32()[0], 3.0f);
  rows.f32()[0] = 100.0f;  // Writes through to the parent.
  EXPECT_EQ(t.f32()[3], 100.0f);
  Tensor flat = t.Reshape({12}).value();
  EXPECT_EQ(flat.f32()[3], 100.0f);
  EXPECT_FALSE(t.Reshape({5, 2}).ok());
  EXPECT_FALSE(t.Slice(3, 5).ok());
  EXPECT_FALSE(t.Slice(2, 1).ok());
  Tensor copy = t.Clone();
  copy.f32()[3] = 7.0f;
  EXPECT_EQ(t.f32()[3], 100.0f);
}

TEST(TensorTest, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 lies exactly between two bf16 values: ties go to even (1.0).
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  // 1 + 3 * 2^-8 ties between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8))),
            1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(-2.5f)), -2.5f);
  Tensor t = Tensor::Zeros(DType::kF32, {2}).value();
  t.f32()[0] = 3.140625f;  // Exact in bf16.
  t.f32()[1] = -0.5f;
  Tensor back = t.To(DType::kBF16).To(DType::kF32);
  EXPECT_EQ(back.f32()[0], 3.140625f);
  EXPECT_EQ(back.f32()[1], -0.5f);
  EXPECT_EQ(t.To(DType::kBF16).DebugString(), "bf16[2]");
}

TEST(TensorTest, BulkConversionsMatchTheScalarOnes) {
  // Every vector width's loop body and its scalar tail (n = 1037), with
  // ties, NaNs, infinities, denormals, signed zeros and random bits.
  std::vector<float> src = {1.0f + std::ldexp(1.0f, -8),
                            1.0f + 3 * std::ldexp(1.0f, -8),
                            std::nanf(""),
                            -std::nanf(""),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::denorm_min(),
                            -0.0f,
                            0.0f,
                            std::numeric_limits<float>::max()};
  uint32_t bits = 12345;
  while (src.size() < 1037) {
    bits = bits * 1664525u + 1013904223u;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    src.push_back(f);
  }
  Tensor t =
      Tensor::Zeros(DType::kF32, {static_cast<int64_t>(src.size())}).value();
  std::memcpy(t.data(), src.data(), t.num_bytes());
  Tensor half = Tensor::Zeros(DType::kBF16, t.shape()).value();
  ASSERT_TRUE(t.ConvertInto(&half).ok());
  Tensor back = Tensor::Zeros(DType::kF32, t.shape()).value();
  ASSERT_TRUE(half.ConvertInto(&back).ok());
  for (size_t i = 0; i < src.size(); ++i) {
    ASSERT_EQ(half.bf16()[i].bits, FloatToBf16(src[i]).bits) << i;
    const float want = Bf16ToFloat(FloatToBf16(src[i]));
    ASSERT_EQ(std::memcmp(&back.f32()[i], &want, sizeof(float)), 0) << i;
  }
  Tensor wrong = Tensor::Zeros(DType::kBF16, {3}).value();
  EXPECT_FALSE(t.ConvertInto(&wrong).ok());
}

TEST(ShardIdTest, ToStringParsesBack) {
  for (ShardId id : {ShardId::Expert(3, 17, 0), ShardId::Expert(0, 0, 7),
                     ShardId::Dense(2)}) {
    auto parsed = ShardId::Parse(id.ToString());
    ASSERT_TRUE(parsed.ok()) << id.ToString();
    EXPECT_EQ(*parsed, id);
  }
  EXPECT_EQ(ShardId::Expert(3, 17, 0).ToString(), "L3.E17.S0");
  for (const char* bad : {"", "L1", "L1.E2.S", "D", "L-1.E0.S0", "D1x", "X3"}) {
    EXPECT_FALSE(ShardId::Parse(bad).ok()) << bad;
  }
  EXPECT_LT(ShardId::Expert(0, 1, 0), ShardId::Expert(0, 1, 1));
  EXPECT_LT(ShardId::Expert(9, 9, 9), ShardId::Dense(0));
}

}  // namespace
}  // namespace switchyard
