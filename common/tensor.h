// Tensor: a dense row-major host tensor of fp32 or bf16 values.
//
// Buffers are 64-byte aligned and reference counted: copies of a Tensor and
// views made by Slice/Reshape share storage without copying. A Tensor is not
// synchronised; callers that share one across threads order their accesses.
#ifndef SWITCHYARD_COMMON_TENSOR_H_
#define SWITCHYARD_COMMON_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/bf16.h"
#include "common/status.h"

namespace switchyard {

enum class DType : uint8_t { kF32 = 1, kBF16 = 2 };

size_t DTypeBytes(DType dtype);
std::string_view DTypeName(DType dtype);
StatusOr<DType> ParseDType(std::string_view name);

constexpr size_t kTensorAlignmentBytes = 64;

// Uninitialised tensor memory of `bytes` (> 0), kTensorAlignmentBytes
// aligned, released with std::free; nullptr when out of memory. From 2 MiB
// up it is 2 MiB aligned and asks for transparent huge pages: the first
// touch of a 4 KiB page costs about 11.5 us on the CI VM (0.35 GB/s), of
// huge pages 1-12 GB/s, and direct I/O into huge pages runs about three
// times faster there (docs/performance.md). The request is advice only:
// heap memory glibc reuses may already be on 4 KiB pages, which it does
// not change; BufferPool maps its large buffers itself for that reason.
void* AllocateTensorMemory(size_t bytes);

class Tensor {
 public:
  // An empty tensor: no shape, no storage.
  Tensor() = default;

  // Allocates zero-filled storage for `shape`. Fails on negative dims or on a
  // size whose byte count overflows.
  static StatusOr<Tensor> Zeros(DType dtype, std::vector<int64_t> shape);

  // A tensor over caller-provided storage (64-byte aligned, at least
  // num_bytes long), e.g. from a BufferPool.
  static StatusOr<Tensor> WithStorage(DType dtype, std::vector<int64_t> shape,
                                      std::shared_ptr<uint8_t> storage);
  // Bytes `shape` of `dtype` needs, or an error for bad shapes.
  static StatusOr<size_t> BytesFor(DType dtype,
                                   const std::vector<int64_t>& shape);

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(size_t i) const { return shape_.at(i); }
  size_t rank() const { return shape_.size(); }
  int64_t num_elements() const;
  size_t num_bytes() const { return num_elements() * DTypeBytes(dtype_); }
  bool empty() const { return storage_ == nullptr; }

  void* data() { return bytes(); }
  const void* data() const { return bytes(); }
  // Typed access; CHECKs that the dtype matches.
  float* f32();
  const float* f32() const;
  BFloat16* bf16();
  const BFloat16* bf16() const;

  // Rows [begin, end) along dimension 0, sharing storage.
  StatusOr<Tensor> Slice(int64_t begin, int64_t end) const;
  // Same storage and element count, another shape.
  StatusOr<Tensor> Reshape(std::vector<int64_t> shape) const;
  // A deep copy with its own storage.
  Tensor Clone() const;
  // Converts to `dtype` (a deep copy; fp32 -> bf16 rounds to nearest even).
  Tensor To(DType dtype) const;
  // The same into `out`, which has this shape (out's dtype says what to
  // convert to), e.g. a buffer from a BufferPool.
  Status ConvertInto(Tensor* out) const;

  // "f32[4,16]".
  std::string DebugString() const;

 private:
  uint8_t* bytes() const { return storage_.get() + offset_bytes_; }

  DType dtype_ = DType::kF32;
  std::vector<int64_t> shape_;
  std::shared_ptr<uint8_t> storage_;
  size_t offset_bytes_ = 0;
};

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_TENSOR_H_
