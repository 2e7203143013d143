#include "common/tensor.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace switchyard {

size_t DTypeBytes(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

std::string_view DTypeName(DType dtype) {
  return dtype == DType::kF32 ? "fp32" : "bf16";
}

StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "fp32" || name == "f32") return DType::kF32;
  if (name == "bf16") return DType::kBF16;
  return InvalidArgumentError("unknown dtype '" + std::string(name) +
                              "' (expected fp32 or bf16)");
}

namespace {

// Without a division per dimension: this runs for every tensor a request
// makes (a 64-bit division costs more than the rest of it).
StatusOr<int64_t> CountElements(const std::vector<int64_t>& shape) {
  constexpr int64_t kMaxElements = std::numeric_limits<int64_t>::max() / 8;
  int64_t count = 1;
  for (int64_t d : shape) {
    if (d < 0) return InvalidArgumentError("negative tensor dimension");
    if (__builtin_mul_overflow(count, d, &count) || count > kMaxElements) {
      return InvalidArgumentError("tensor size overflows");
    }
  }
  return count;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ",";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

}  // namespace

void* AllocateTensorMemory(size_t bytes) {
  constexpr size_t kHugePage = size_t{2} << 20;
  if (bytes < kHugePage) {
    const size_t rounded = (bytes + kTensorAlignmentBytes - 1) /
                           kTensorAlignmentBytes * kTensorAlignmentBytes;
    return std::aligned_alloc(kTensorAlignmentBytes, rounded);
  }
  void* raw = nullptr;
  if (::posix_memalign(&raw, kHugePage, bytes) != 0) return nullptr;
  // Advice only: where transparent huge pages are off, 4 KiB pages.
  ::madvise(raw, bytes / kHugePage * kHugePage, MADV_HUGEPAGE);
  return raw;
}

StatusOr<Tensor> Tensor::Zeros(DType dtype, std::vector<int64_t> shape) {
  ASSIGN_OR_RETURN(int64_t count, CountElements(shape));
  size_t bytes = static_cast<size_t>(count) * DTypeBytes(dtype);
  // aligned_alloc needs a size that is a multiple of the alignment, and we
  // never hand out a null buffer, even for zero elements.
  size_t rounded = (bytes + kTensorAlignmentBytes - 1) / kTensorAlignmentBytes *
                   kTensorAlignmentBytes;
  if (rounded == 0) rounded = kTensorAlignmentBytes;
  void* raw = AllocateTensorMemory(rounded);
  if (raw == nullptr) {
    return ResourceExhaustedError("cannot allocate " + std::to_string(bytes) +
                                  " bytes for a tensor");
  }
  std::memset(raw, 0, rounded);
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.storage_ = std::shared_ptr<uint8_t>(static_cast<uint8_t*>(raw), std::free);
  return t;
}

StatusOr<size_t> Tensor::BytesFor(DType dtype,
                                  const std::vector<int64_t>& shape) {
  ASSIGN_OR_RETURN(int64_t count, CountElements(shape));
  return static_cast<size_t>(count) * DTypeBytes(dtype);
}

StatusOr<Tensor> Tensor::WithStorage(DType dtype, std::vector<int64_t> shape,
                                     std::shared_ptr<uint8_t> storage) {
  RETURN_IF_ERROR(CountElements(shape).status());
  if (storage == nullptr ||
      reinterpret_cast<uintptr_t>(storage.get()) % kTensorAlignmentBytes) {
    return InvalidArgumentError("tensor storage must be 64-byte aligned");
  }
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.storage_ = std::move(storage);
  return t;
}

int64_t Tensor::num_elements() const {
  if (storage_ == nullptr) return 0;
  int64_t count = 1;
  for (int64_t d : shape_) count *= d;
  return count;
}

float* Tensor::f32() {
  CHECK(dtype_ == DType::kF32) << DebugString();
  return reinterpret_cast<float*>(bytes());
}
const float* Tensor::f32() const {
  CHECK(dtype_ == DType::kF32) << DebugString();
  return reinterpret_cast<const float*>(bytes());
}
BFloat16* Tensor::bf16() {
  CHECK(dtype_ == DType::kBF16) << DebugString();
  return reinterpret_cast<BFloat16*>(bytes());
}
const BFloat16* Tensor::bf16() const {
  CHECK(dtype_ == DType::kBF16) << DebugString();
  return reinterpret_cast<const BFloat16*>(bytes());
}

StatusOr<Tensor> Tensor::Slice(int64_t begin, int64_t end) const {
  if (shape_.empty()) return InvalidArgumentError("cannot slice a scalar");
  if (begin < 0 || end < begin || end > shape_[0]) {
    return InvalidArgumentError("slice [" + std::to_string(begin) + "," +
                                std::to_string(end) + ") out of range for " +
                                DebugString());
  }
  int64_t row_elements = 1;
  for (size_t i = 1; i < shape_.size(); ++i) row_elements *= shape_[i];
  Tensor view = *this;
  view.shape_[0] = end - begin;
  view.offset_bytes_ += begin * row_elements * DTypeBytes(dtype_);
  return view;
}

StatusOr<Tensor> Tensor::Reshape(std::vector<int64_t> shape) const {
  ASSIGN_OR_RETURN(int64_t count, CountElements(shape));
  if (count != num_elements()) {
    return InvalidArgumentError("cannot reshape " + DebugString() + " to " +
                                ShapeString(shape));
  }
  Tensor view = *this;
  view.shape_ = std::move(shape);
  return view;
}

Tensor Tensor::Clone() const {
  Tensor copy = Tensor::Zeros(dtype_, shape_).value();
  std::memcpy(copy.data(), data(), num_bytes());
  return copy;
}

Tensor Tensor::To(DType dtype) const {
  if (dtype == dtype_) return Clone();
  Tensor out = Tensor::Zeros(dtype, shape_).value();
  (void)ConvertInto(&out);  // Same shape by construction.
  return out;
}

Status Tensor::ConvertInto(Tensor* out) const {
  if (out->shape() != shape_) {
    return InvalidArgumentError("cannot convert " + DebugString() + " into " +
                                out->DebugString());
  }
  if (out->dtype() == dtype_) {
    std::memcpy(out->data(), data(), num_bytes());
  } else if (out->dtype() == DType::kBF16) {
    FloatsToBf16(f32(), num_elements(), out->bf16());
  } else {
    Bf16ToFloats(bf16(), num_elements(), out->f32());
  }
  return OkStatus();
}

std::string Tensor::DebugString() const {
  return std::string(DTypeName(dtype_)) + ShapeString(shape_);
}

}  // namespace switchyard
