// Fuzzes the direct chunk reader of checkpoint restores
// (storage/sst_chunk_reader.h): the chunk block table property as RocksDB
// returns it from an SST file (ParseChunkBlocks), then ReadChunksDirect on
// an SST file's bytes, parsing RocksDB block entries at the offsets the
// property lists.
//
// Input: bytes 0-1 (little-endian) the property's length, then the
// property; then, for each listed key in key order (at most 8), the
// chunk's length (2 bytes) and xxh3 (8 bytes) as a manifest would give
// them; the rest is the file. Checks: on success every chunk's bytes match
// its checksum.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/buffer_pool.h"
#include "common/digest.h"
#include "fuzz/fuzz_support.h"
#include "storage/sst_chunk_reader.h"

namespace {

uint64_t TakeLe(std::string_view* rest, size_t bytes) {
  uint64_t v = 0;
  for (size_t i = 0; i < bytes && !rest->empty(); ++i) {
    v |= uint64_t{static_cast<uint8_t>(rest->front())} << (8 * i);
    rest->remove_prefix(1);
  }
  return v;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  switchyard::fuzz::QuietLogging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace switchyard;
  using namespace switchyard::storage;
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  const size_t property_bytes = TakeLe(&rest, 2);
  if (rest.size() < property_bytes) return 0;
  const std::string property(rest.substr(0, property_bytes));
  rest.remove_prefix(property_bytes);
  auto blocks = ParseChunkBlocks(property);
  if (!blocks.ok()) return 0;
  std::vector<ChunkTarget> chunks;
  std::vector<std::string> buffers;
  buffers.reserve(8);
  for (const auto& [key, offset] : *blocks) {
    if (chunks.size() == 8) break;
    ChunkTarget chunk;
    chunk.key = key;
    chunk.bytes = TakeLe(&rest, 2);
    chunk.xxh3 = TakeLe(&rest, 8);
    buffers.emplace_back(chunk.bytes, '\0');
    chunk.dst = buffers.back().data();
    chunks.push_back(std::move(chunk));
  }
  const std::string path = fuzz::TempDir() + "/chunks.sst";
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(rest.data(), static_cast<std::streamsize>(rest.size()));
    out.close();
    FUZZ_CHECK(out.good());
  }
  // Windows of 4 MiB, kept between runs as a store keeps them.
  static auto* windows =
      new std::shared_ptr<BufferPool>(BufferPool::Create(size_t{64} << 20));
  size_t pieces = 0;
  const Status status = ReadChunksDirect(
      path, *blocks, chunks, **windows,
      [&](size_t chunk, const char*, size_t size) {
        FUZZ_CHECK(chunk < chunks.size() && size <= kPieceBytes);
        ++pieces;
      });
  if (status.ok()) {
    for (const ChunkTarget& chunk : chunks) {
      FUZZ_CHECK(Xxh3(chunk.dst, chunk.bytes) == chunk.xxh3);
    }
  }
  return 0;
}
