#include "expert_worker/cpu/activation_kernels.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

namespace switchyard::expert_worker {
namespace {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// tanh(sqrt(2/pi) (x + 0.044715 x^3)): the GELU (tanh form) core.
inline float GeluTanh(float x) {
  return tanhf(kGeluC * (x + kGeluA * x * x * x));
}

}  // namespace

void SetKernelThreads(int threads) {
  if (threads > 0) omp_set_num_threads(threads);
}

// Below this many elements a kernel runs on the calling thread alone.
constexpr int64_t kParallelElements = 65536;

void ActivationForward(Activation act, float* h, const float* bias,
                       int64_t tokens, int64_t f, float* a) {
  const int64_t width = act == Activation::kSwiglu ? 2 * f : f;
#pragma omp parallel for schedule(static) if (tokens * f > kParallelElements)
  for (int64_t t = 0; t < tokens; ++t) {
    float* hr = h + t * width;
    float* ar = a + t * f;
    if (bias != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) hr[j] += bias[j];
    }
    switch (act) {
      case Activation::kGelu:
#pragma omp simd
        for (int64_t j = 0; j < f; ++j) {
          const float x = hr[j];
          ar[j] = 0.5f * x * (1.0f + GeluTanh(x));
        }
        break;
      case Activation::kRelu:
#pragma omp simd
        for (int64_t j = 0; j < f; ++j) ar[j] = hr[j] > 0 ? hr[j] : 0.0f;
        break;
      case Activation::kSwiglu:
#pragma omp simd
        for (int64_t j = 0; j < f; ++j) {
          const float g = hr[j];
          ar[j] = g / (1.0f + expf(-g)) * hr[f + j];
        }
        break;
    }
  }
}

void ActivationBackward(Activation act, const float* h, const float* da,
                        int64_t tokens, int64_t f, float* dh, float* a) {
  const int64_t width = act == Activation::kSwiglu ? 2 * f : f;
#pragma omp parallel for schedule(static) if (tokens * f > kParallelElements)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* hr = h + t * width;
    const float* dar = da + t * f;
    float* dhr = dh + t * width;
    float* ar = a + t * f;
    switch (act) {
      case Activation::kGelu:
#pragma omp simd
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
#pragma omp simd
        for (int64_t j = 0; j < f; ++j) {
          const bool on = hr[j] > 0;
          ar[j] = on ? hr[j] : 0.0f;
          dhr[j] = on ? dar[j] : 0.0f;
        }
        break;
      case Activation::kSwiglu:
#pragma omp simd
        for (int64_t j = 0; j < f; ++j) {
          const float g = hr[j], up = hr[f + j];
          const float s = 1.0f / (1.0f + expf(-g));
          const float silu = g * s;
          ar[j] = silu * up;
          dhr[j] = dar[j] * up * s * (1.0f + g * (1.0f - s));
          dhr[f + j] = dar[j] * silu;
        }
        break;
    }
  }
}

void AddRowBias(float* m, int64_t rows, int64_t n, const float* bias) {
#pragma omp parallel for schedule(static) if (rows * n > kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    float* row = m + r * n;
#pragma omp simd
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
