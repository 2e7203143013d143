#include "expert_worker/cpu/activation_kernels.h"

#include <omp.h>

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

void ActivationForward(Activation act, const float* h, int64_t tokens,
                       int64_t f, float* a) {
  const int64_t width = act == Activation::kSwiglu ? 2 * f : f;
#pragma omp parallel for schedule(static) if (tokens * f > 65536)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* hr = h + t * width;
    float* ar = a + t * f;
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
#pragma omp parallel for schedule(static) if (tokens * f > 65536)
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

}  // namespace switchyard::expert_worker
