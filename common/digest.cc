#include "common/digest.h"

#include <xxhash.h>

#include <cstdio>

// Debian's libxxhash compiles XXH3 for x86-64's baseline (SSE2): 16.7 GB/s
// on the CI VM, which made the hashes the largest cost of a checkpoint
// restore. Its *_dispatch entry points pick AVX2 or AVX-512 at run time
// (about 60 GB/s on cached bytes) and give the same hashes; this header
// maps the XXH3 calls below onto them.
#if defined(__x86_64__) && __has_include(<xxh_x86dispatch.h>)
#include <xxh_x86dispatch.h>
#endif

namespace switchyard {

struct Xxh3Stream::State {
  XXH3_state_t* xxh = XXH3_createState();
  ~State() { XXH3_freeState(xxh); }
};

Xxh3Stream::Xxh3Stream() : state_(std::make_unique<State>()) { Reset(); }
Xxh3Stream::~Xxh3Stream() = default;

void Xxh3Stream::Reset() { XXH3_64bits_reset(state_->xxh); }

void Xxh3Stream::Update(const void* data, size_t size) {
  XXH3_64bits_update(state_->xxh, data, size);
}

uint64_t Xxh3Stream::value() const { return XXH3_64bits_digest(state_->xxh); }

void Digest::Add(const std::string& name, const Tensor& tensor) {
  AddHeader(name, tensor);
  if (!tensor.empty()) AddBytes(tensor.data(), tensor.num_bytes());
}

void Digest::AddHeader(const std::string& name, const Tensor& tensor) {
  xxh_.Update(name.data(), name.size() + 1);
  if (tensor.empty()) return;
  const uint8_t dtype = static_cast<uint8_t>(tensor.dtype());
  xxh_.Update(&dtype, 1);
  xxh_.Update(tensor.shape().data(), tensor.shape().size() * sizeof(int64_t));
}

void Digest::AddBytes(const void* data, size_t size) {
  xxh_.Update(data, size);
}

uint64_t Digest::value() const { return xxh_.value(); }

std::string Digest::hex() const {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx",
                static_cast<unsigned long long>(value()));
  return buf;
}

uint64_t Xxh3(const void* data, size_t size) { return XXH3_64bits(data, size); }

std::string CombineDigests(const std::map<std::string, std::string>& digests) {
  Digest combined;
  for (const auto& [name, hex] : digests) {
    combined.Add(name + "=" + hex, Tensor());
  }
  return combined.hex();
}

}  // namespace switchyard
