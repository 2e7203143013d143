#include "common/digest.h"

#include <xxhash.h>

#include <cstdio>

namespace switchyard {

struct Digest::State {
  XXH3_state_t* xxh = XXH3_createState();
  ~State() { XXH3_freeState(xxh); }
};

Digest::Digest() : state_(std::make_unique<State>()) {
  XXH3_64bits_reset(state_->xxh);
}
Digest::~Digest() = default;

void Digest::Add(const std::string& name, const Tensor& tensor) {
  AddHeader(name, tensor);
  if (!tensor.empty()) AddBytes(tensor.data(), tensor.num_bytes());
}

void Digest::AddHeader(const std::string& name, const Tensor& tensor) {
  XXH3_64bits_update(state_->xxh, name.data(), name.size() + 1);
  if (tensor.empty()) return;
  const uint8_t dtype = static_cast<uint8_t>(tensor.dtype());
  XXH3_64bits_update(state_->xxh, &dtype, 1);
  XXH3_64bits_update(state_->xxh, tensor.shape().data(),
                     tensor.shape().size() * sizeof(int64_t));
}

void Digest::AddBytes(const void* data, size_t size) {
  XXH3_64bits_update(state_->xxh, data, size);
}

uint64_t Digest::value() const { return XXH3_64bits_digest(state_->xxh); }

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
