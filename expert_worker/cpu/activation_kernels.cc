#include "expert_worker/cpu/activation_kernels.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/target_clones.h"
#include "common/vector_math.h"

namespace switchyard::expert_worker {
namespace {

using vector_math::Exp;
using vector_math::Tanh;

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// Below this many elements a kernel runs on the calling thread alone.
constexpr int64_t kParallelElements = 65536;
// Rows a kernel thread takes at a time.
constexpr int64_t kRowBlock = 16;

// tanh(sqrt(2/pi) (x + 0.044715 x^3)): the GELU (tanh form) core.
inline float GeluTanh(float x) {
  return Tanh(kGeluC * (x + kGeluA * x * x * x));
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
