// A pool of reusable, 64-byte aligned tensor buffers.
//
// Fresh memory is expensive on these machines (a first touch of a page costs
// about 11.5 us, 50x memcpy), so hot paths take buffers from here instead of
// allocating: Take() returns a tensor whose storage comes from a size class
// (each class 1, 1.25, 1.5 or 1.75 times a power of two, at least 4 KiB) and
// goes back to the pool when the last tensor sharing it is destroyed. The
// contents of a taken tensor are unspecified. At most max_cached_bytes of
// idle buffers are kept; beyond that, freed buffers are released.
// Thread-safe.
#ifndef SWITCHYARD_COMMON_BUFFER_POOL_H_
#define SWITCHYARD_COMMON_BUFFER_POOL_H_

#include <cstddef>
#include <map>
#include <memory>
#include <vector>

#include "common/mutex.h"
#include "common/tensor.h"
#include "common/thread_annotations.h"

namespace switchyard {

class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  static std::shared_ptr<BufferPool> Create(size_t max_cached_bytes);
  ~BufferPool();

  StatusOr<Tensor> Take(DType dtype, std::vector<int64_t> shape) EXCLUDES(mu_);
  // `t` in `dtype`: `t` itself when it is in `dtype` already, else a
  // converted copy (Tensor::ConvertInto) in a buffer taken from here.
  StatusOr<Tensor> Converted(const Tensor& t, DType dtype) EXCLUDES(mu_);

  // The size class that holds `bytes`.
  static size_t ClassBytes(size_t bytes);
  size_t cached_bytes() const EXCLUDES(mu_);

 private:
  explicit BufferPool(size_t max_cached_bytes)
      : max_cached_bytes_(max_cached_bytes) {}
  void Give(uint8_t* buffer, size_t class_bytes) EXCLUDES(mu_);

  const size_t max_cached_bytes_;
  mutable Mutex mu_;
  std::map<size_t, std::vector<uint8_t*>> free_ GUARDED_BY(mu_);
  size_t cached_bytes_ GUARDED_BY(mu_) = 0;
};

// The rows of `parts` (fp32, `cols` wide) one after another, in a buffer
// from `pool`. Parts without rows are skipped; a single part with rows is
// returned as is (shared), and none gives an empty tensor.
StatusOr<Tensor> ConcatRows(BufferPool& pool,
                            const std::vector<const Tensor*>& parts,
                            int64_t cols);

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_BUFFER_POOL_H_
