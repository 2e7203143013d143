// Elementwise float math that computes the same bits at every vector width:
// only IEEE +, *, / and compares (no libm, whose vector and scalar versions
// differ), in files compiled without contraction into FMAs
// (-ffp-contract=off, as expert_worker/CMakeLists.txt and
// trainer/CMakeLists.txt set for their kernel files), so that the
// baseline, AVX2 and AVX-512 builds of a loop (target_clones) agree; and
// sums over a row in 16 fixed lanes, so that a reduction vectorises without
// depending on the vector width either.
#ifndef SWITCHYARD_COMMON_VECTOR_MATH_H_
#define SWITCHYARD_COMMON_VECTOR_MATH_H_

#include <cstdint>
#include <cstring>

namespace switchyard::vector_math {

// tanh(x) as a rational function of x (odd degree 13 over even degree 6,
// the minimax fit Eigen uses), clamped where tanh rounds to +-1, and x
// itself for |x| < 0.0004: within 3.6e-7 of tanh everywhere
// (ActivationKernelsTest checks GELU against that). Only IEEE +, *, / and
// compares, compiled
// without contraction into FMAs (CMakeLists.txt), so the baseline, AVX2 and
// AVX-512 builds of a loop compute the same bits at any vector width; and
// unlike glibc's vector tanhf it does not change with the glibc version.
inline float Tanh(float v) {
  constexpr float kClamp = 7.90531110763549805f;
  float x = v > kClamp ? kClamp : v;
  x = x < -kClamp ? -kClamp : x;
  const float x2 = x * x;
  float p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = x2 * p + -8.60467152213735e-11f;
  p = x2 * p + 5.12229709037114e-08f;
  p = x2 * p + 1.48572235717979e-05f;
  p = x2 * p + 6.37261928875436e-04f;
  p = x2 * p + 4.89352455891786e-03f;
  p = x * p;
  float q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = x2 * q + 2.26843463243900e-03f;
  q = x2 * q + 4.89352518554385e-03f;
  const float r = p / q;  // Always divided, so every vector lane may be.
  return v < 0.0004f && v > -0.0004f ? v : r;
}

// e^v, clamped to [e^-87, e^88] (normal floats): 2^n e^r with n = v / ln 2
// rounded to nearest (the 1.5 * 2^23 trick) and |r| <= ln 2 / 2 (ln 2 in
// two parts, so r is exact), e^r by its Taylor series to r^7 (relative
// error under 7e-9 before rounding), 2^n built from its exponent bits.
// The same IEEE-only rules as Tanh.
inline float Exp(float v) {
  // NaN goes through the arithmetic as 0 (its integer conversion would be
  // undefined) and comes back out as NaN.
  const bool nan = v != v;
  float x = v > 88.0f ? 88.0f : v;
  x = x < -87.0f ? -87.0f : x;
  x = nan ? 0.0f : x;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860676533018704e-6f;
  float p = r * (1.0f / 5040) + 1.0f / 720;
  p = r * p + 1.0f / 120;
  p = r * p + 1.0f / 24;
  p = r * p + 1.0f / 6;
  p = r * p + 0.5f;
  p = r * p + 1.0f;
  p = r * p + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return nan ? v : p * scale;
}

// Lanes of a row reduction: element i goes to lane i % kLanes.
constexpr int kLanes = 16;

// Adds the lanes in a fixed tree (8, 4, 2, 1 apart).
inline float SumLanes(float* lanes) {
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  }
  return lanes[0];
}

// sum_i a[i] * b[i] over n elements, in lanes.
inline float Dot(const float* __restrict a, const float* __restrict b,
                 int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  for (int l = 0; i + l < n; ++l) lanes[l] += a[i + l] * b[i + l];
  return SumLanes(lanes);
}

// The largest of x[0 .. n) (n >= 1), in lanes too (a maximum is exact in
// any order).
inline float Max(const float* x, int64_t n) {
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] = x[i + l] > lanes[l] ? x[i + l] : lanes[l];
    }
  }
  for (int l = 0; i + l < n; ++l) {
    lanes[l] = x[i + l] > lanes[l] ? x[i + l] : lanes[l];
  }
  float m = lanes[0];
  for (int l = 1; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

}  // namespace switchyard::vector_math

#endif  // SWITCHYARD_COMMON_VECTOR_MATH_H_
