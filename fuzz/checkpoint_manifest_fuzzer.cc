// Fuzzes how a worker reads a stored shard checkpoint back
// (storage/checkpoint_read.h, the parsing half of CheckpointStore::
// ReadShard): the manifest's bytes as RocksDB returns them, the chunk reads
// it plans (into new tensors, or into a live shard's own), and each chunk's
// bytes as the iterator returns them, copied and checked the way
// ReadThroughRocksDb does.
//
// Input: byte 0 bit 0 picks the reader (0: new tensors, ReadShard; 1: the
// caller's tensors, ReadShardInto, shaped as the manifest says); bytes 1-2
// (little-endian) the manifest's length, then the manifest (read for shard
// "L0.E1.S0" at step 7); then chunk values in key order, each a 2-byte
// little-endian length and the bytes. Checks: every planned chunk lies
// within its tensor (the direct reader writes exactly there).
//
// NOTE: the store allocates the tensors a self-consistent manifest declares
// before reading their chunks; inputs declaring more than 64 MiB are
// skipped so that runs stay within the fuzzer's memory limit.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "fuzz/fuzz_support.h"
#include "storage/checkpoint_read.h"

namespace {

constexpr int64_t kStep = 7;
constexpr char kShard[] = "L0.E1.S0";
constexpr uint64_t kMaxDeclaredBytes = uint64_t{64} << 20;

// Reads a 2-byte little-endian length and that many bytes from *rest;
// false when they are not all there.
bool TakePart(std::string_view* rest, std::string_view* part) {
  if (rest->size() < 2) return false;
  const size_t n = static_cast<uint8_t>((*rest)[0]) |
                   static_cast<size_t>(static_cast<uint8_t>((*rest)[1])) << 8;
  rest->remove_prefix(2);
  if (rest->size() < n) return false;
  *part = rest->substr(0, n);
  rest->remove_prefix(n);
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  switchyard::fuzz::QuietLogging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace switchyard;
  using namespace switchyard::storage;
  if (size < 1) return 0;
  const bool into = data[0] & 1;
  std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  std::string_view manifest_bytes;
  if (!TakePart(&rest, &manifest_bytes)) return 0;
  auto manifest = ParseShardManifest(manifest_bytes, kStep, kShard);
  if (!manifest.ok()) return 0;
  uint64_t declared = 0;
  for (const auto& tm : manifest->tensors()) {
    if (tm.bytes() > kMaxDeclaredBytes) return 0;
    int64_t elements = 1;
    for (int64_t d : tm.shape()) {
      if (d < 0 || __builtin_mul_overflow(elements, d, &elements) ||
          elements > static_cast<int64_t>(kMaxDeclaredBytes)) {
        return 0;
      }
    }
    declared += tm.bytes() + 4 * static_cast<uint64_t>(elements);
    if (declared > kMaxDeclaredBytes) return 0;
  }
  ShardSnapshot snapshot;
  snapshot.shard = kShard;
  snapshot.step = kStep;
  snapshot.epoch = manifest->epoch();
  if (into) {  // A live shard's tensors, as the manifest describes them.
    for (const auto& tm : manifest->tensors()) {
      NamedTensor named{tm.name(), Tensor()};
      if (tm.dtype() != 0) {
        auto t = Tensor::Zeros(static_cast<DType>(tm.dtype()),
                               {tm.shape().begin(), tm.shape().end()});
        if (t.ok()) named.tensor = std::move(t).value();
      }
      snapshot.tensors.push_back(std::move(named));
    }
  }
  auto plan = PlanShardRead(*manifest, /*allocate=*/!into, &snapshot);
  if (!plan.ok()) return 0;
  FUZZ_CHECK(snapshot.tensors.size() ==
             static_cast<size_t>(manifest->tensors_size()));
  FUZZ_CHECK(plan->chunks.size() == plan->chunk_tensor.size());
  if (plan->consistent) {
    for (size_t i = 0; i < plan->chunks.size(); ++i) {
      const ChunkTarget& chunk = plan->chunks[i];
      const Tensor& t = snapshot.tensors[plan->chunk_tensor[i]].tensor;
      const char* begin = static_cast<const char*>(t.data());
      FUZZ_CHECK(begin != nullptr);
      FUZZ_CHECK(chunk.dst >= begin &&
                 chunk.bytes <=
                     t.num_bytes() - static_cast<size_t>(chunk.dst - begin));
    }
  }
  // ReadThroughRocksDb: each tensor's chunks in key order.
  for (int i = 0; i < manifest->tensors_size(); ++i) {
    const auto& tm = manifest->tensors(i);
    char* out = static_cast<char*>(snapshot.tensors[i].tensor.data());
    uint64_t offset = 0;
    for (int c = 0; c < tm.chunk_xxh3_size(); ++c) {
      std::string_view value;
      if (!TakePart(&rest, &value)) return 0;  // "chunk c is missing".
      if (!CopyCheckpointChunk(tm, c, value, "chunk", out, &offset).ok()) {
        return 0;
      }
    }
    if (!CheckCheckpointTensorComplete(tm, "fuzz", offset).ok()) return 0;
  }
  (void)SnapshotDigest(snapshot);
  return 0;
}
