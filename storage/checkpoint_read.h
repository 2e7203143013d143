// The parsing half of CheckpointStore::ReadShard (storage/checkpoint_store.h,
// docs/checkpoint_format.md): a stored manifest's bytes, the chunk reads it
// plans, and each chunk's bytes as the store returns them. Apart from
// RocksDB so that tests and fuzz/checkpoint_manifest_fuzzer.cc can drive
// them with bytes alone; the store calls exactly these. Pure functions.
#ifndef SWITCHYARD_STORAGE_CHECKPOINT_READ_H_
#define SWITCHYARD_STORAGE_CHECKPOINT_READ_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint.pb.h"
#include "common/status.h"
#include "storage/checkpoint_store.h"
#include "storage/sst_chunk_reader.h"

namespace switchyard::storage {

// The key of chunk `chunk` of tensor `tensor` of `shard` at `step`.
std::string CheckpointChunkKey(int64_t step, const std::string& shard,
                               int tensor, uint64_t chunk);

// The manifest stored for `shard` at `step`, from its bytes: DATA_LOSS when
// they do not parse or name another shard or step, FAILED_PRECONDITION for
// another format version.
StatusOr<checkpoint::ShardManifest> ParseShardManifest(
    std::string_view bytes, int64_t step, const std::string& shard);

// Where each chunk of a shard checkpoint goes.
struct ChunkPlan {
  std::vector<ChunkTarget> chunks;   // Every chunk of every tensor, in order.
  std::vector<size_t> chunk_tensor;  // The tensor of each chunk.
  // Every chunk is non-empty and each tensor's chunks cover its bytes
  // exactly: the direct read (sst_chunk_reader.h) may be tried.
  bool consistent = true;
};

// Checks `manifest` (parsed for snapshot->shard at snapshot->step) against
// the tensors it is read into and plans the chunk reads. With `allocate`,
// appends a tensor per manifest tensor to snapshot->tensors (empty where
// the manifest has none); else the tensors there (the caller's) must have
// the manifest's names, dtypes and shapes, else FAILED_PRECONDITION.
// DATA_LOSS when the manifest contradicts itself.
StatusOr<ChunkPlan> PlanShardRead(const checkpoint::ShardManifest& manifest,
                                  bool allocate, ShardSnapshot* snapshot);

// Copies `value`, read from the store as chunk `chunk` of `tm`, to
// out + *offset and advances *offset; `what` names the chunk in errors.
// DATA_LOSS when it does not fit the tensor's bytes or does not match its
// checksum.
Status CopyCheckpointChunk(const checkpoint::TensorManifest& tm, int chunk,
                           std::string_view value, const std::string& what,
                           char* out, uint64_t* offset);

// The bytes `tm` says its tensor has, after its chunks were copied to
// *offset: DATA_LOSS unless they are all there.
Status CheckCheckpointTensorComplete(const checkpoint::TensorManifest& tm,
                                     const std::string& where, uint64_t offset);

}  // namespace switchyard::storage

#endif  // SWITCHYARD_STORAGE_CHECKPOINT_READ_H_
