// Finding non-finite values (NaN, +-infinity) in tensors: what a diverged
// run produces, and what must never be trained on, pushed or committed.
#ifndef SWITCHYARD_COMMON_FINITE_H_
#define SWITCHYARD_COMMON_FINITE_H_

#include <cstdint>
#include <cstring>
#include <string>

#include "common/status.h"
#include "common/tensor.h"

namespace switchyard {

// The index of the first NaN or infinity of `data[0, n)`, or -1. Scans in
// blocks without branches (vectorised), then finds the index in the block.
inline int64_t FirstNonFinite(const float* data, int64_t n) {
  constexpr int64_t kBlock = 1024;
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t end = begin + kBlock < n ? begin + kBlock : n;
    uint32_t any = 0;
    for (int64_t i = begin; i < end; ++i) {
      uint32_t bits;
      std::memcpy(&bits, data + i, sizeof(bits));
      any |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
    }
    if (any == 0) continue;
    for (int64_t i = begin; i < end; ++i) {
      uint32_t bits;
      std::memcpy(&bits, data + i, sizeof(bits));
      if ((bits & 0x7f800000u) == 0x7f800000u) return i;
    }
  }
  return -1;
}

// As FirstNonFinite, for an fp32 or bf16 tensor (-1 for an empty one).
inline int64_t FirstNonFinite(const Tensor& t) {
  if (t.empty()) return -1;
  if (t.dtype() == DType::kF32)
    return FirstNonFinite(t.f32(), t.num_elements());
  const auto* bytes = static_cast<const uint8_t*>(t.data());
  for (int64_t i = 0; i < t.num_elements(); ++i) {
    uint16_t bits;
    std::memcpy(&bits, bytes + 2 * i, sizeof(bits));
    if ((bits & 0x7f80u) == 0x7f80u) return i;
  }
  return -1;
}

// OK when `t` is finite; else INVALID_ARGUMENT "<what> holds a non-finite
// value (<value> at element <i>)".
inline Status CheckFinite(const Tensor& t, const std::string& what) {
  const int64_t i = FirstNonFinite(t);
  if (i < 0) return OkStatus();
  float value = 0;
  if (t.dtype() == DType::kF32) {
    value = t.f32()[i];
  } else {
    uint16_t bits;
    std::memcpy(&bits, static_cast<const uint8_t*>(t.data()) + 2 * i, 2);
    const uint32_t wide = uint32_t{bits} << 16;
    std::memcpy(&value, &wide, sizeof(value));
  }
  return InvalidArgumentError(what + " holds a non-finite value (" +
                              std::to_string(value) + " at element " +
                              std::to_string(i) + ")");
}

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_FINITE_H_
