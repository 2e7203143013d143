// bfloat16 conversions: fp32 -> bf16 rounds to nearest even; NaN stays NaN.
#ifndef SWITCHYARD_COMMON_BF16_H_
#define SWITCHYARD_COMMON_BF16_H_

#include <cstdint>
#include <cstring>

namespace switchyard {

struct BFloat16 {
  uint16_t bits = 0;
};
static_assert(sizeof(BFloat16) == 2, "bf16 is two bytes on the wire");

inline BFloat16 FloatToBf16(float value) {
  uint32_t u;
  std::memcpy(&u, &value, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it quiet and a NaN.
    return BFloat16{static_cast<uint16_t>((u >> 16) | 0x0040u)};
  }
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>((u + rounding_bias) >> 16)};
}

inline float Bf16ToFloat(BFloat16 value) {
  const uint32_t u = static_cast<uint32_t>(value.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The same over n elements, vectorised (integer operations only, so the bits
// do not depend on the instruction set chosen at load time).
void FloatsToBf16(const float* src, int64_t n, BFloat16* dst);
void Bf16ToFloats(const BFloat16* src, int64_t n, float* dst);

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_BF16_H_
