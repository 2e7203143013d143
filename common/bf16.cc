#include "common/bf16.h"

#include "common/target_clones.h"

namespace switchyard {

SY_TARGET_CLONES void FloatsToBf16(const float* __restrict src, int64_t n,
                                   BFloat16* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = FloatToBf16(src[i]);
}

SY_TARGET_CLONES void Bf16ToFloats(const BFloat16* __restrict src, int64_t n,
                                   float* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
}

}  // namespace switchyard
