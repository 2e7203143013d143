#include "common/buffer_pool.h"

#include <cstdlib>

namespace switchyard {

std::shared_ptr<BufferPool> BufferPool::Create(size_t max_cached_bytes) {
  return std::shared_ptr<BufferPool>(new BufferPool(max_cached_bytes));
}

BufferPool::~BufferPool() {
  for (auto& [bytes, buffers] : free_) {
    for (uint8_t* b : buffers) std::free(b);
  }
}

size_t BufferPool::ClassBytes(size_t bytes) {
  size_t base = 4096;
  while (base * 2 <= bytes) base *= 2;
  for (size_t quarter = 0; quarter <= 4; ++quarter) {
    const size_t candidate = base + base / 4 * quarter;
    if (candidate >= bytes) return candidate;
  }
  return base * 2;
}

size_t BufferPool::cached_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cached_bytes_;
}

StatusOr<Tensor> BufferPool::Take(DType dtype, std::vector<int64_t> shape) {
  ASSIGN_OR_RETURN(size_t bytes, Tensor::BytesFor(dtype, shape));
  const size_t class_bytes = ClassBytes(bytes);
  uint8_t* buffer = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(class_bytes);
    if (it != free_.end() && !it->second.empty()) {
      buffer = it->second.back();
      it->second.pop_back();
      cached_bytes_ -= class_bytes;
    }
  }
  if (buffer == nullptr) {
    buffer = static_cast<uint8_t*>(AllocateTensorMemory(class_bytes));
    if (buffer == nullptr) {
      return ResourceExhaustedError("cannot allocate " +
                                    std::to_string(class_bytes) +
                                    " bytes for a pooled tensor");
    }
  }
  std::weak_ptr<BufferPool> weak = weak_from_this();
  std::shared_ptr<uint8_t> storage(buffer, [weak, class_bytes](uint8_t* b) {
    if (auto pool = weak.lock()) {
      pool->Give(b, class_bytes);
    } else {
      std::free(b);
    }
  });
  return Tensor::WithStorage(dtype, std::move(shape), std::move(storage));
}

void BufferPool::Give(uint8_t* buffer, size_t class_bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cached_bytes_ + class_bytes <= max_cached_bytes_) {
      free_[class_bytes].push_back(buffer);
      cached_bytes_ += class_bytes;
      return;
    }
  }
  std::free(buffer);
}

}  // namespace switchyard
