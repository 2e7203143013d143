#include "common/buffer_pool.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace switchyard {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

// Buffers of a huge page and more get a mapping of their own, 2 MiB
// aligned and advised onto transparent huge pages before any page of it is
// touched. Heap memory (what AllocateTensorMemory returns below the
// allocator's mmap threshold, which glibc raises up to 32 MiB as large
// blocks are freed) may already be backed by 4 KiB pages, which the advice
// does not change: on the CI VM an O_DIRECT read of 4 MiB into such pages
// took 2.4-3.5 ms, into huge pages about 0.5 ms (docs/performance.md,
// "bench/checkpoint").
uint8_t* AllocateBuffer(size_t class_bytes) {
  if (class_bytes < kHugePage) {
    return static_cast<uint8_t*>(AllocateTensorMemory(class_bytes));
  }
  void* mapped =
      ::mmap(nullptr, class_bytes + kHugePage, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapped == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(mapped);
  const uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
  // Unmaps the unaligned head and the tail (class sizes of 2 MiB and up
  // are multiples of 512 KiB, so of the page size).
  if (aligned > start) ::munmap(mapped, aligned - start);
  const uintptr_t end = start + class_bytes + kHugePage;
  if (end > aligned + class_bytes) {
    ::munmap(reinterpret_cast<void*>(aligned + class_bytes),
             end - (aligned + class_bytes));
  }
  // Advice only: where transparent huge pages are off, 4 KiB pages.
  ::madvise(reinterpret_cast<void*>(aligned),
            class_bytes / kHugePage * kHugePage, MADV_HUGEPAGE);
  return reinterpret_cast<uint8_t*>(aligned);
}

void FreeBuffer(uint8_t* buffer, size_t class_bytes) {
  if (class_bytes < kHugePage) {
    std::free(buffer);
  } else {
    ::munmap(buffer, class_bytes);
  }
}

}  // namespace

std::shared_ptr<BufferPool> BufferPool::Create(size_t max_cached_bytes) {
  return std::shared_ptr<BufferPool>(new BufferPool(max_cached_bytes));
}

BufferPool::~BufferPool() {
  for (auto& [bytes, buffers] : free_) {
    for (uint8_t* b : buffers) FreeBuffer(b, bytes);
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
  MutexLock lock(&mu_);
  return cached_bytes_;
}

StatusOr<Tensor> BufferPool::Take(DType dtype, std::vector<int64_t> shape) {
  ASSIGN_OR_RETURN(size_t bytes, Tensor::BytesFor(dtype, shape));
  const size_t class_bytes = ClassBytes(bytes);
  uint8_t* buffer = nullptr;
  {
    MutexLock lock(&mu_);
    auto it = free_.find(class_bytes);
    if (it != free_.end() && !it->second.empty()) {
      buffer = it->second.back();
      it->second.pop_back();
      cached_bytes_ -= class_bytes;
    }
  }
  if (buffer == nullptr) {
    buffer = AllocateBuffer(class_bytes);
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
      FreeBuffer(b, class_bytes);
    }
  });
  return Tensor::WithStorage(dtype, std::move(shape), std::move(storage));
}

StatusOr<Tensor> BufferPool::Converted(const Tensor& t, DType dtype) {
  if (t.dtype() == dtype) return t;
  ASSIGN_OR_RETURN(Tensor out, Take(dtype, t.shape()));
  RETURN_IF_ERROR(t.ConvertInto(&out));
  return out;
}

void BufferPool::Give(uint8_t* buffer, size_t class_bytes) {
  {
    MutexLock lock(&mu_);
    if (cached_bytes_ + class_bytes <= max_cached_bytes_) {
      free_[class_bytes].push_back(buffer);
      cached_bytes_ += class_bytes;
      return;
    }
  }
  FreeBuffer(buffer, class_bytes);
}

StatusOr<Tensor> ConcatRows(BufferPool& pool,
                            const std::vector<const Tensor*>& parts,
                            int64_t cols) {
  int64_t rows = 0;
  const Tensor* only = nullptr;
  int with_rows = 0;
  for (const Tensor* p : parts) {
    if (p->empty() || p->dim(0) == 0) continue;
    rows += p->dim(0);
    only = p;
    ++with_rows;
  }
  if (with_rows == 0) return Tensor();
  if (with_rows == 1) return *only;
  ASSIGN_OR_RETURN(Tensor out, pool.Take(DType::kF32, {rows, cols}));
  char* dst = static_cast<char*>(out.data());
  for (const Tensor* p : parts) {
    if (p->empty()) continue;
    std::memcpy(dst, p->data(), p->num_bytes());
    dst += p->num_bytes();
  }
  return out;
}

}  // namespace switchyard
