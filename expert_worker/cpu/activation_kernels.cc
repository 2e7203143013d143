#include "expert_worker/cpu/activation_kernels.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/target_clones.h"

namespace switchyard::expert_worker {
namespace {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// Below this many elements a kernel runs on the calling thread alone.
constexpr int64_t kParallelElements = 65536;
// Rows a kernel thread takes at a time.
constexpr int64_t kRowBlock = 16;

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

// tanh(sqrt(2/pi) (x + 0.044715 x^3)): the GELU (tanh form) core.
inline float GeluTanh(float x) {
  return Tanh(kGeluC * (x + kGeluA * x * x * x));
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

// The logistic sigmoid, 1 / (1 + e^-g).
inline float Sigmoid(float g) { return 1.0f / (1.0f + Exp(-g)); }

// Rows [t0, t1) of ActivationForward. Built for AVX-512, AVX2 and the
// baseline; the loader picks one for the CPU (all give the same bits).
SY_TARGET_CLONES void ForwardRows(Activation act, float* h, const float* bias,
                                  int64_t t0, int64_t t1, int64_t f, float* a) {
  const int64_t width = act == Activation::kSwiglu ? 2 * f : f;
  for (int64_t t = t0; t < t1; ++t) {
    float* __restrict hr = h + t * width;
    float* __restrict ar = a + t * f;
    if (bias != nullptr) {
      for (int64_t j = 0; j < width; ++j) hr[j] += bias[j];
    }
    switch (act) {
      case Activation::kGelu:
        for (int64_t j = 0; j < f; ++j) {
          const float x = hr[j];
          ar[j] = 0.5f * x * (1.0f + GeluTanh(x));
        }
        break;
      case Activation::kRelu:
        for (int64_t j = 0; j < f; ++j) ar[j] = hr[j] > 0 ? hr[j] : 0.0f;
        break;
      case Activation::kSwiglu:
        for (int64_t j = 0; j < f; ++j) {
          const float g = hr[j];
          ar[j] = g * Sigmoid(g) * hr[f + j];
        }
        break;
    }
  }
}

// One row of SwiGLU's backward: gates g and ups u in, d(g) and d(u) out.
// A function of its own, with a restrict pointer per half: GCC 12 does not
// vectorise the loop inline in BackwardRows.
inline void SwigluBackwardRow(const float* __restrict gates,
                              const float* __restrict ups,
                              const float* __restrict da, int64_t f,
                              float* __restrict dgates, float* __restrict dups,
                              float* __restrict a) {
  for (int64_t j = 0; j < f; ++j) {
    const float g = gates[j], up = ups[j];
    const float s = Sigmoid(g);
    const float silu = g * s;
    a[j] = silu * up;
    dgates[j] = da[j] * up * s * (1.0f + g * (1.0f - s));
    dups[j] = da[j] * silu;
  }
}

// Rows [t0, t1) of ActivationBackward.
SY_TARGET_CLONES void BackwardRows(Activation act, const float* h,
                                   const float* da, int64_t t0, int64_t t1,
                                   int64_t f, float* dh, float* a) {
  const int64_t width = act == Activation::kSwiglu ? 2 * f : f;
  for (int64_t t = t0; t < t1; ++t) {
    const float* __restrict hr = h + t * width;
    const float* __restrict dar = da + t * f;
    float* __restrict dhr = dh + t * width;
    float* __restrict ar = a + t * f;
    switch (act) {
      case Activation::kGelu:
        for (int64_t j = 0; j < f; ++j) {
          const float x = hr[j];
          const float th = GeluTanh(x);
          ar[j] = 0.5f * x * (1.0f + th);
          const float grad =
              0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * kGeluC *
                                       (1.0f + 3.0f * kGeluA * x * x);
          dhr[j] = dar[j] * grad;
        }
        break;
      case Activation::kRelu:
        for (int64_t j = 0; j < f; ++j) {
          const bool on = hr[j] > 0;
          ar[j] = on ? hr[j] : 0.0f;
          dhr[j] = on ? dar[j] : 0.0f;
        }
        break;
      case Activation::kSwiglu:
        SwigluBackwardRow(hr, hr + f, dar, f, dhr, dhr + f, ar);
        break;
    }
  }
}

}  // namespace

void SetKernelThreads(int threads) {
  if (threads > 0) omp_set_num_threads(threads);
}

void ActivationForward(Activation act, float* h, const float* bias,
                       int64_t tokens, int64_t f, float* a) {
  const int64_t blocks = (tokens + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static) if (tokens * f > kParallelElements)
  for (int64_t b = 0; b < blocks; ++b) {
    ForwardRows(act, h, bias, b * kRowBlock,
                std::min(tokens, (b + 1) * kRowBlock), f, a);
  }
}

void ActivationBackward(Activation act, const float* h, const float* da,
                        int64_t tokens, int64_t f, float* dh, float* a) {
  const int64_t blocks = (tokens + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static) if (tokens * f > kParallelElements)
  for (int64_t b = 0; b < blocks; ++b) {
    BackwardRows(act, h, da, b * kRowBlock,
                 std::min(tokens, (b + 1) * kRowBlock), f, dh, a);
  }
}

void AddRowBias(float* m, int64_t rows, int64_t n, const float* bias) {
#pragma omp parallel for schedule(static) if (rows * n > kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    float* row = m + r * n;
    for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
  }
}

void ConvertToBf16(const float* src, int64_t n, BFloat16* dst) {
  constexpr int64_t kBlock = 16384;  // Elements a thread converts at once.
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (n > kParallelElements)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t from = b * kBlock;
    FloatsToBf16(src + from, std::min(kBlock, n - from), dst + from);
  }
}

}  // namespace switchyard::expert_worker
