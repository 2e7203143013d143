// The checkpoint store: shard checkpoints in a worker's local RocksDB
// (DESIGN.md "Checkpoints"; the byte layout is docs/checkpoint_format.md).
//
// A shard checkpoint is the shard's tensors (parameters and every optimizer
// tensor) at one step, stored as xxh3-checksummed chunks, plus a manifest
// (format version, step, epoch, tensor names, dtypes, shapes, chunk
// checksums, digest). WriteShard builds an SST file holding the chunks and
// one holding the manifest, syncs them and ingests both at once: the
// shard's checkpoint appears whole or not at all, and survives a crash once
// WriteShard returns. Readers go by manifests only, and ReadShard verifies
// every chunk (read straight from the chunk file with direct I/O where it
// qualifies: sst_chunk_reader.h).
//
// CheckpointStore is the seam tests wrap to inject faults. Implementations
// are thread-safe.
#ifndef SWITCHYARD_STORAGE_CHECKPOINT_STORE_H_
#define SWITCHYARD_STORAGE_CHECKPOINT_STORE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint.pb.h"
#include "common/status.h"
#include "common/tensor.h"

namespace rocksdb {
class FileSystem;
}  // namespace rocksdb

namespace switchyard::storage {

constexpr uint32_t kCheckpointFormatVersion = 1;

struct NamedTensor {
  std::string name;
  Tensor tensor;  // May be empty (a tensor the shard does not have).
};

// One shard's state at the boundary after `step` updates.
struct ShardSnapshot {
  std::string shard;  // "L0.E3.S0", "D1"
  int64_t step = 0;
  uint64_t epoch = 0;
  std::vector<NamedTensor> tensors;
};

struct CheckpointStoreOptions {
  // Chunk size: far under RocksDB's 4 GiB value limit, large enough to
  // stream at disk speed.
  size_t chunk_bytes = size_t{4} << 20;
  // What the store's files go through; null (the default):
  // DirectWriteFileSystem() (direct_write_fs.h). Tests wrap that one to
  // inject faults (tests/testing/power_loss_fs.h).
  std::shared_ptr<rocksdb::FileSystem> file_system;
};

class CheckpointStore {
 public:
  virtual ~CheckpointStore() = default;

  // Writes `snapshot` durably and atomically (replacing an earlier write of
  // the same shard and step). Returns its manifest.
  virtual StatusOr<checkpoint::ShardManifest> WriteShard(
      const ShardSnapshot& snapshot) = 0;
  // The shard at `step`, every chunk verified: NOT_FOUND when there is no
  // complete checkpoint of it, DATA_LOSS (naming shard, step, tensor and
  // chunk) when bytes do not match the manifest.
  virtual StatusOr<ShardSnapshot> ReadShard(int64_t step,
                                            const std::string& shard) = 0;
  // The same into `into`'s tensors, allocated by the caller (a live shard:
  // no allocation, one copy): their names, dtypes and shapes must be the
  // manifest's, else FAILED_PRECONDITION. On error the tensors may hold
  // part of the checkpoint.
  virtual Status ReadShardInto(int64_t step, const std::string& shard,
                               ShardSnapshot* into) = 0;
  // Manifests of every stored shard checkpoint, by (step, shard); only
  // those of `step` when given.
  virtual StatusOr<std::vector<checkpoint::ShardManifest>> Manifests(
      std::optional<int64_t> step) = 0;
  // Removes every shard checkpoint with first <= step < end (range deletion)
  // and the files that held only those.
  virtual Status DropSteps(int64_t first, int64_t end) = 0;
  // Reads every file of the store back: each SST file against the xxh3
  // file checksum recorded when it was written, and RocksDB's block
  // checksums where a file has them (chunk files have none: their chunks
  // carry their own). DATA_LOSS naming the file on a mismatch. Files from
  // before file checksums (2026-11-24) have only their block checksums.
  virtual Status VerifyFiles() = 0;
};

// Opens (creating if missing) the checkpoint store in directory `dir`.
StatusOr<std::unique_ptr<CheckpointStore>> OpenCheckpointStore(
    const std::string& dir, const CheckpointStoreOptions& options);
// Opens an existing store for reading only (`switchyard ckpt`), also while
// its worker is running; WriteShard and DropSteps fail.
StatusOr<std::unique_ptr<CheckpointStore>> OpenCheckpointStoreReadOnly(
    const std::string& dir);

// WriteShard for every snapshot, `threads` at a time (two streams wrote
// about 25% faster than one on this 2-core VM: bench/checkpoint). One
// manifest or error per snapshot, in order.
std::vector<StatusOr<checkpoint::ShardManifest>> WriteShards(
    CheckpointStore& store, const std::vector<ShardSnapshot>& snapshots,
    int threads);

// ReadShardInto for every snapshot in `into` (each names its shard) at
// `step`, `threads` shards at a time. Through RocksDB's iterator two
// streams read about twice as fast as one on the 2-core CI VM; the direct
// path reads ahead on its own and runs about as fast with one or two
// (docs/performance.md, bench/checkpoint). One status per shard, in order.
std::vector<Status> ReadShardsInto(CheckpointStore& store, int64_t step,
                                   std::vector<ShardSnapshot>* into,
                                   int threads);

// The digest of a snapshot's tensors (the manifest's `digest`): Digest over
// (shard + "." + name, tensor) in order, so it equals what the worker logs.
std::string SnapshotDigest(const ShardSnapshot& snapshot);

}  // namespace switchyard::storage

#endif  // SWITCHYARD_STORAGE_CHECKPOINT_STORE_H_
