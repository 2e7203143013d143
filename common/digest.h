// Digests of tensors (xxh3-64), for checking that two runs hold the same
// parameters bit for bit. Incremental; thread-compatible.
#ifndef SWITCHYARD_COMMON_DIGEST_H_
#define SWITCHYARD_COMMON_DIGEST_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "common/tensor.h"

namespace switchyard {

// Streaming xxh3-64, for bytes that arrive in pieces (chunk checksums on
// restore). Equal to Xxh3 over the concatenated pieces.
class Xxh3Stream {
 public:
  Xxh3Stream();
  ~Xxh3Stream();
  Xxh3Stream(const Xxh3Stream&) = delete;
  Xxh3Stream& operator=(const Xxh3Stream&) = delete;

  void Reset();
  void Update(const void* data, size_t size);
  uint64_t value() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

class Digest {
 public:
  // Adds a name (so that equal bytes under different names differ) and the
  // tensor's dtype, shape and bytes. Empty tensors add only the name.
  void Add(const std::string& name, const Tensor& tensor);
  // Add in two parts, for bytes that arrive in pieces: AddHeader(name,
  // tensor) and then AddBytes over all of the tensor's bytes in order give
  // the same digest as Add(name, tensor).
  void AddHeader(const std::string& name, const Tensor& tensor);
  void AddBytes(const void* data, size_t size);
  uint64_t value() const;
  // 16 hex digits.
  std::string hex() const;

 private:
  Xxh3Stream xxh_;
};

// xxh3-64 of `size` bytes (chunk checksums). Xxh3, Xxh3Stream and Digest
// run XXH3 on the widest vectors the CPU has (AVX-512 or AVX2, chosen at
// run time; the same hashes as the portable code, about 3.5x faster here).
uint64_t Xxh3(const void* data, size_t size);

// One digest of named digests (shard name -> hex), in name order: equal for
// equal maps however the shards were spread over workers.
std::string CombineDigests(const std::map<std::string, std::string>& digests);

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_DIGEST_H_
