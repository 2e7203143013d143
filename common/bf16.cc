#include "common/bf16.h"

namespace switchyard {

__attribute__((target_clones("avx512f", "avx2", "default"))) void FloatsToBf16(
    const float* __restrict src, int64_t n, BFloat16* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = FloatToBf16(src[i]);
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void Bf16ToFloats(
    const BFloat16* __restrict src, int64_t n, float* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
}

}  // namespace switchyard
