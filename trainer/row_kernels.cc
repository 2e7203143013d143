#include "trainer/row_kernels.h"

#include <algorithm>
#include <cmath>

#include "common/target_clones.h"
#include "common/vector_math.h"

namespace switchyard::trainer::kernels {

using vector_math::Dot;
using vector_math::Exp;
using vector_math::kLanes;
using vector_math::Max;
using vector_math::SumLanes;

namespace {

// out[j] = e^(in[j] - m) for j < n (in may be out); returns their sum, in
// lanes.
inline float ExpShifted(const float* in, float m, int n, float* out) {
  float lanes[kLanes] = {};
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      out[j + l] = Exp(in[j + l] - m);
      lanes[l] += out[j + l];
    }
  }
  for (int l = 0; j + l < n; ++l) {
    out[j + l] = Exp(in[j + l] - m);
    lanes[l] += out[j + l];
  }
  return SumLanes(lanes);
}

}  // namespace

SY_TARGET_CLONES void RmsNormForward(const float* x, const float* g, int n,
                                     int d, float eps, float* y) {
  for (int r = 0; r < n; ++r) {
    const float* __restrict xr = x + static_cast<int64_t>(r) * d;
    float* __restrict yr = y + static_cast<int64_t>(r) * d;
    const float inv = 1.0f / std::sqrt(Dot(xr, xr, d) / d + eps);
    for (int i = 0; i < d; ++i) yr[i] = xr[i] * inv * g[i];
  }
}

SY_TARGET_CLONES void RmsNormBackward(const float* x, const float* g,
                                      const float* dy, int n, int d, float eps,
                                      float* dx, float* dg) {
  for (int r = 0; r < n; ++r) {
    const float* __restrict xr = x + static_cast<int64_t>(r) * d;
    const float* __restrict dyr = dy + static_cast<int64_t>(r) * d;
    float* __restrict dxr = dx + static_cast<int64_t>(r) * d;
    const float inv = 1.0f / std::sqrt(Dot(xr, xr, d) / d + eps);
    // y_i = x_i * inv * g_i; dinv/dx_j = -inv^3 x_j / d.
    float lanes[kLanes] = {};  // sum_i dy_i g_i x_i
    int i = 0;
    for (; i + kLanes <= d; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        lanes[l] += dyr[i + l] * g[i + l] * xr[i + l];
      }
    }
    for (int l = 0; i + l < d; ++l)
      lanes[l] += dyr[i + l] * g[i + l] * xr[i + l];
    const float dot = SumLanes(lanes);
    const float c = dot * inv * inv * inv;
    for (int j = 0; j < d; ++j) {
      dg[j] += dyr[j] * xr[j] * inv;
      dxr[j] = dyr[j] * g[j] * inv - c * xr[j] / d;
    }
  }
}

SY_TARGET_CLONES void CausalSoftmax(float* probs, int len) {
  for (int i = 0; i < len; ++i) {
    float* p = probs + static_cast<int64_t>(i) * len;
    const int n = i + 1;
    const float sum = ExpShifted(p, Max(p, n), n, p);
    for (int k = 0; k < n; ++k) p[k] /= sum;
    std::fill(p + n, p + len, 0.0f);
  }
}

SY_TARGET_CLONES void CausalSoftmaxBackward(const float* probs, float* g,
                                            int len, float scale) {
  for (int i = 0; i < len; ++i) {
    const float* __restrict p = probs + static_cast<int64_t>(i) * len;
    float* __restrict gr = g + static_cast<int64_t>(i) * len;
    const int n = i + 1;
    const float dot = Dot(p, gr, n);
    for (int j = 0; j < n; ++j) gr[j] = p[j] * (gr[j] - dot) * scale;
    std::fill(gr + n, gr + len, 0.0f);
  }
}

SY_TARGET_CLONES float CrossEntropy(const float* logits, const int32_t* targets,
                                    int n, int vocab, float* dlogits) {
  float total = 0;
  for (int r = 0; r < n; ++r) {
    const float* __restrict lg = logits + static_cast<int64_t>(r) * vocab;
    float* __restrict dl = dlogits + static_cast<int64_t>(r) * vocab;
    const float m = Max(lg, vocab);
    const float sum = ExpShifted(lg, m, vocab, dl);
    total += std::log(sum) + m - lg[targets[r]];
    for (int k = 0; k < vocab; ++k) dl[k] = dl[k] / sum / n;
    dl[targets[r]] -= 1.0f / n;
  }
  return n > 0 ? total / n : 0.0f;
}

}  // namespace switchyard::trainer::kernels
