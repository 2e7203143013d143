// Restores that read a shard's chunks straight from its SST file with large
// direct reads, the fast path of CheckpointStore::ReadShardInto
// (docs/checkpoint_format.md, "Reading").
//
// RocksDB reads a multi-MiB value as one block read through the page cache,
// then checksums and copies it: on the CI VM that moved 1.2-1.7 GB/s, this
// path 5-8 GB/s, 0.71-0.95 of raw 16 MiB O_DIRECT reads of the same files
// (bench/checkpoint). Every SST file the store writes carries a table
// property, recorded while the file is built, with the offset of the data
// block that holds each chunk key. ReadChunksDirect reads the file's chunk
// region in aligned windows (kReadAhead ahead) into reused buffers,
// parses each entry's header (key and value length) at the recorded block,
// checks the key, the length and the chunk's xxh3 against the manifest, and
// copies the value into its tensor. Anything that does not match is an error
// and the store reads the shard through RocksDB instead, so the fast path can
// only ever be faster, never different.
#ifndef SWITCHYARD_STORAGE_SST_CHUNK_READER_H_
#define SWITCHYARD_STORAGE_SST_CHUNK_READER_H_

#include <rocksdb/table_properties.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/buffer_pool.h"
#include "common/status.h"

namespace switchyard::storage {

// The table property holding the chunk keys' block offsets.
inline constexpr char kChunkBlocksProperty[] = "switchyard.chunk-blocks.v1";

// Records, for every key under `key_prefix` put into a table, the offset of
// the data block that holds it, as kChunkBlocksProperty (present, maybe
// empty, in every table built with it).
std::shared_ptr<rocksdb::TablePropertiesCollectorFactory>
NewChunkBlocksCollectorFactory(std::string key_prefix);

// The key -> block offset map stored in a kChunkBlocksProperty value;
// INVALID_ARGUMENT if it does not parse.
StatusOr<std::map<std::string, uint64_t>> ParseChunkBlocks(
    const std::string& property);

// One chunk to read: its key, where it goes and what it must be.
struct ChunkTarget {
  std::string key;
  char* dst = nullptr;
  uint64_t bytes = 0;
  uint64_t xxh3 = 0;
};

// Direct reads go through windows of this size, taken from a BufferPool
// (mappings of their own on transparent huge pages). On the CI VM a 4 MiB
// direct read into huge pages took about 0.5 ms, into heap memory on 4 KiB
// pages 2.4-3.5 ms; and the host's copy into the guest runs faster while
// the buffers it fills stay within the CPU's cache, so windows are small
// (docs/performance.md, "bench/checkpoint").
inline constexpr size_t kWindowBytes = size_t{4} << 20;
// Windows being read while the caller copies out of another: with one,
// the disk idled between reads.
inline constexpr size_t kReadAhead = 2;

// Called with each piece of a chunk (at most kPieceBytes) right after it
// was copied to its destination, in order: `chunk` indexes `chunks`. The
// piece is still in the CPU's cache: the place to hash it again.
using PieceCallback =
    std::function<void(size_t chunk, const char* data, size_t size)>;
inline constexpr size_t kPieceBytes = size_t{256} << 10;

// Reads `chunks` (in the file's key order) from the SST file at `path`,
// whose chunk block offsets are `blocks`. OK once every chunk is in place
// with its length and checksum; otherwise an error saying what did not
// match (the destinations may then hold part of the data).
Status ReadChunksDirect(const std::string& path,
                        const std::map<std::string, uint64_t>& blocks,
                        const std::vector<ChunkTarget>& chunks,
                        BufferPool& windows,
                        const PieceCallback& on_piece = nullptr);

// Shards this process has restored by each path (for tests and the
// benchmark's report).
struct ShardReadCounts {
  uint64_t direct = 0;
  uint64_t through_rocksdb = 0;
};
ShardReadCounts GetShardReadCounts();
void CountShardRead(bool direct);

}  // namespace switchyard::storage

#endif  // SWITCHYARD_STORAGE_SST_CHUNK_READER_H_
