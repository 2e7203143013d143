// CheckpointStore on RocksDB: a chunk file and a manifest file, ingested
// together, per shard checkpoint.
// Layout: docs/checkpoint_format.md.
#include "storage/checkpoint_store.h"

#include <rocksdb/convenience.h>
#include <rocksdb/db.h>
#include <rocksdb/file_checksum.h>
#include <rocksdb/options.h>
#include <rocksdb/sst_file_writer.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <set>
#include <thread>

#include "common/digest.h"
#include "common/thread_name.h"
#include "storage/checkpoint_read.h"
#include "storage/direct_write_fs.h"
#include "storage/durable_dir.h"
#include "storage/rocks_status.h"
#include "storage/sst_chunk_reader.h"

namespace switchyard::storage {
namespace {

namespace fs = std::filesystem;

std::string Hex(uint64_t v, int width) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%0*" PRIx64, width, v);
  return buf;
}

// "<kind>/<step>/": every key of one step ("ckpt" chunks, "manifest"s);
// steps sort in key order.
std::string StepPrefix(const char* kind, int64_t step) {
  return std::string(kind) + "/" + Hex(static_cast<uint64_t>(step), 16) + "/";
}
// "ckpt/<step>/<shard>/": every chunk of one shard at one step.
std::string ChunkPrefix(int64_t step, const std::string& shard) {
  return StepPrefix("ckpt", step) + shard + "/";
}
std::string ChunkKey(int64_t step, const std::string& shard, int tensor,
                     uint64_t chunk) {
  return ChunkPrefix(step, shard) + Hex(tensor, 4) + "/" + Hex(chunk, 8);
}
std::string ManifestKey(int64_t step, const std::string& shard) {
  return StepPrefix("manifest", step) + shard;
}
// The smallest key after every key that starts with `prefix` ending in '/'.
std::string PrefixEnd(std::string prefix) {
  prefix.back() = '/' + 1;
  return prefix;
}

// Whole-file checksums: xxh3-64 of every byte of an SST file, computed as
// the file is written (SstFileWriter, compactions) and kept in RocksDB's
// MANIFEST; `VerifyFiles` (switchyard ckpt verify) reads every file back
// against it. Runs at memory speed (Xxh3Stream: AVX-512 here).
constexpr char kFileChecksumName[] = "switchyard.xxh3-64";

class Xxh3FileChecksum : public rocksdb::FileChecksumGenerator {
 public:
  void Update(const char* data, size_t n) override { hash_.Update(data, n); }
  void Finalize() override {
    const uint64_t v = hash_.value();
    checksum_.assign(reinterpret_cast<const char*>(&v), sizeof(v));
  }
  std::string GetChecksum() const override { return checksum_; }
  const char* Name() const override { return kFileChecksumName; }

 private:
  Xxh3Stream hash_;
  std::string checksum_;
};

class Xxh3FileChecksumFactory : public rocksdb::FileChecksumGenFactory {
 public:
  std::unique_ptr<rocksdb::FileChecksumGenerator> CreateFileChecksumGenerator(
      const rocksdb::FileChecksumGenContext& context) override {
    if (!context.requested_checksum_func_name.empty() &&
        context.requested_checksum_func_name != kFileChecksumName) {
      return nullptr;  // A file checksummed otherwise: RocksDB reports it.
    }
    return std::make_unique<Xxh3FileChecksum>();
  }
  const char* Name() const override { return "Xxh3FileChecksumFactory"; }
};

// Options for the database and the SST files written into it. RocksDB's
// block checksums are xxh3, not its default crc32c: Debian's build computes
// crc32c in software, which capped reads at about 0.12 GB/s
// (bench/checkpoint). Files are not advised random: a restore reads every
// chunk in key order, and kernel readahead took reads from about 1.0 to
// 1.2-1.6 GB/s here.
rocksdb::Options StoreOptions(rocksdb::Env* env) {
  rocksdb::Options options;
  options.paranoid_checks = true;
  options.compression = rocksdb::kNoCompression;
  options.advise_random_on_open = false;
  options.env = env;
  options.table_properties_collector_factories.push_back(
      NewChunkBlocksCollectorFactory("ckpt/"));
  options.file_checksum_gen_factory =
      std::make_shared<Xxh3FileChecksumFactory>();
  rocksdb::BlockBasedTableOptions table;
  table.checksum = rocksdb::kXXH3;
  options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  return options;
}

// Chunk files have no block checksums: every chunk carries its own xxh3
// in the manifest, checked on every read, and the whole file its xxh3 file
// checksum. Debian's RocksDB computes block checksums with SSE2 XXH3, the
// largest CPU cost of a write (bench/checkpoint: with the one-pass hashes
// of WriteChunks, writes went from 0.53-0.67 to 0.63-0.80 of raw). The
// table footer records the type, so RocksDB reads either kind.
rocksdb::Options ChunkFileOptions(rocksdb::Options options) {
  rocksdb::BlockBasedTableOptions table;
  table.checksum = rocksdb::kNoChecksum;
  options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  return options;
}

// The name a shard's tensor goes into its digest under (SnapshotDigest).
std::string DigestName(const std::string& shard, const std::string& tensor) {
  return shard + "." + tensor;
}

std::string Where(int64_t step, const std::string& shard) {
  return "checkpoint of " + shard + " at step " + std::to_string(step);
}

class RocksCheckpointStore : public CheckpointStore {
 public:
  // `env`, when not null, is db_options.env (owned).
  RocksCheckpointStore(std::string dir, std::unique_ptr<rocksdb::Env> env,
                       rocksdb::Options db_options,
                       std::unique_ptr<rocksdb::DB> db,
                       CheckpointStoreOptions options)
      : dir_(std::move(dir)),
        env_(std::move(env)),
        db_options_(std::move(db_options)),
        chunk_file_options_(ChunkFileOptions(db_options_)),
        db_(std::move(db)),
        options_(options) {}

  StatusOr<checkpoint::ShardManifest> WriteShard(
      const ShardSnapshot& snapshot) override {
    if (snapshot.shard.empty() || snapshot.step < 0 ||
        snapshot.shard.find('/') != std::string::npos) {
      return InvalidArgumentError("bad shard checkpoint '" + snapshot.shard +
                                  "' at step " + std::to_string(snapshot.step));
    }
    checkpoint::ShardManifest manifest;
    manifest.set_format_version(kCheckpointFormatVersion);
    manifest.set_step(snapshot.step);
    manifest.set_epoch(snapshot.epoch);
    manifest.set_shard(snapshot.shard);
    manifest.set_written_unix_ms(
        std::chrono::duration_cast<std::chrono::milliseconds>(
            std::chrono::system_clock::now().time_since_epoch())
            .count());

    // Two files, ingested together: the chunks, then the manifest. Apart,
    // each shard's chunk file covers only its own key range, so RocksDB
    // puts it on the last level beside the others and never compacts it;
    // a file holding chunks and manifest would span every other shard's
    // keys in between, land in level 0 and be rewritten by compactions.
    const std::string base = dir_ + "/ingest/" + snapshot.shard + "-" +
                             std::to_string(snapshot.step) + "-" +
                             std::to_string(counter_.fetch_add(1));
    const std::string chunks_path = base + kDirectWriteSuffix;
    const std::string manifest_path = base + ".manifest.sst";
    rocksdb::IngestExternalFileArg ingest;
    rocksdb::ExternalSstFileInfo written;
    Status s = WriteChunks(snapshot, chunks_path, &manifest, &written);
    if (s.ok() && manifest.total_bytes() > 0) AddFile(written, &ingest);
    if (s.ok()) {
      rocksdb::SstFileWriter writer(rocksdb::EnvOptions(), db_options_);
      s = ROCKS_STATUS(writer.Open(manifest_path), "open " + manifest_path);
      if (s.ok()) {
        s = ROCKS_STATUS(writer.Put(ManifestKey(snapshot.step, snapshot.shard),
                                    manifest.SerializeAsString()),
                         "write manifest");
      }
      // Finish syncs the file.
      if (s.ok()) {
        s = ROCKS_STATUS(writer.Finish(&written), "finish " + manifest_path);
      }
      if (s.ok()) AddFile(written, &ingest);
    }
    // Ingestion links both files into the database and records them, with
    // their file checksums (computed as they were written, so not read
    // again here), in RocksDB's MANIFEST (synced) in one edit: all or
    // nothing.
    if (s.ok()) {
      ingest.column_family = db_->DefaultColumnFamily();
      ingest.options.move_files = true;
      ingest.options.failed_move_fall_back_to_copy = true;
      ingest.options.verify_file_checksum = false;
      // A file overlapping earlier keys (a shard rewritten at the same step)
      // gets a newer sequence number; it is kept in RocksDB's MANIFEST, not
      // written into the file, which would break its file checksum.
      ingest.options.write_global_seqno = false;
      s = ROCKS_STATUS(db_->IngestExternalFiles({ingest}), "ingest " + base);
    }
    if (!s.ok()) {
      std::error_code ec;
      fs::remove(chunks_path, ec);
      fs::remove(manifest_path, ec);
      return s.WithContext("writing " + Where(snapshot.step, snapshot.shard));
    }
    return manifest;
  }

  static void AddFile(const rocksdb::ExternalSstFileInfo& file,
                      rocksdb::IngestExternalFileArg* ingest) {
    ingest->external_files.push_back(file.file_path);
    ingest->files_checksums.push_back(file.file_checksum);
    ingest->files_checksum_func_names.push_back(file.file_checksum_func_name);
  }

  StatusOr<ShardSnapshot> ReadShard(int64_t step,
                                    const std::string& shard) override {
    ShardSnapshot snapshot;
    RETURN_IF_ERROR(Read(step, shard, /*allocate=*/true, &snapshot));
    return snapshot;
  }

  Status ReadShardInto(int64_t step, const std::string& shard,
                       ShardSnapshot* into) override {
    return Read(step, shard, /*allocate=*/false, into);
  }

  Status Read(int64_t step, const std::string& shard, bool allocate,
              ShardSnapshot* out) {
    std::string value;
    rocksdb::ReadOptions read;
    read.verify_checksums = true;
    rocksdb::Status rs = db_->Get(read, ManifestKey(step, shard), &value);
    if (rs.IsNotFound()) return NotFoundError("no " + Where(step, shard));
    RETURN_IF_ERROR(
        ROCKS_STATUS(rs, "reading the manifest of " + Where(step, shard)));
    ASSIGN_OR_RETURN(const checkpoint::ShardManifest manifest,
                     ParseShardManifest(value, step, shard));
    ShardSnapshot& snapshot = *out;
    snapshot.shard = shard;
    snapshot.step = step;
    snapshot.epoch = manifest.epoch();
    ASSIGN_OR_RETURN(const ChunkPlan plan,
                     PlanShardRead(manifest, allocate, &snapshot));
    std::string digest;
    const bool direct =
        plan.consistent &&
        ReadDirect(step, snapshot, plan.chunks, plan.chunk_tensor, &digest);
    CountShardRead(direct);
    if (!direct) {
      RETURN_IF_ERROR(ReadThroughRocksDb(step, manifest, &snapshot));
      digest = SnapshotDigest(snapshot);
    }
    if (digest != manifest.digest()) {
      return DataLossError(Where(step, shard) +
                           " does not match the digest in its manifest");
    }
    return OkStatus();
  }

  // The fast path (storage/sst_chunk_reader.h): true when every chunk was
  // read straight from the SST file that holds it. That file must be the
  // only place RocksDB could return the chunks from: the one table whose
  // chunk block property lists every chunk, while every other table
  // overlapping the shard's keys has the property and lists none of them
  // (tables from before the property, or from elsewhere, disqualify), and
  // the memtables hold nothing there.
  // It also computes the shard's digest (SnapshotDigest) as the bytes pass
  // through the cache, into `digest`.
  bool ReadDirect(int64_t step, const ShardSnapshot& snapshot,
                  const std::vector<ChunkTarget>& chunks,
                  const std::vector<size_t>& chunk_tensor,
                  std::string* digest) {
    const std::string& shard = snapshot.shard;
    if (chunks.empty()) return false;
    const std::string prefix = ChunkPrefix(step, shard);
    const std::string end = PrefixEnd(prefix);
    const rocksdb::Range range(prefix, end);
    uint64_t mem_entries = 0, mem_bytes = 0;
    db_->GetApproximateMemTableStats(range, &mem_entries, &mem_bytes);
    rocksdb::TablePropertiesCollection tables;
    if (mem_entries != 0 ||
        !db_->GetPropertiesOfTablesInRange(db_->DefaultColumnFamily(), &range,
                                           1, &tables)
             .ok()) {
      return false;
    }
    std::string path;
    std::map<std::string, uint64_t> blocks;
    for (const auto& [file, props] : tables) {
      auto found = props->user_collected_properties.find(kChunkBlocksProperty);
      if (found == props->user_collected_properties.end()) return false;
      auto listed = ParseChunkBlocks(found->second);
      if (!listed.ok()) return false;
      size_t holds = 0;
      for (const ChunkTarget& chunk : chunks) holds += listed->count(chunk.key);
      if (holds == 0) continue;
      if (holds != chunks.size() || !path.empty()) return false;
      path = file;
      blocks = std::move(listed).value();
    }
    if (path.empty()) return false;
    Digest running;
    size_t headers = 0;  // Tensors whose header `running` has.
    auto headers_through = [&](size_t last) {
      for (; headers <= last && headers < snapshot.tensors.size(); ++headers) {
        const NamedTensor& t = snapshot.tensors[headers];
        running.AddHeader(DigestName(shard, t.name), t.tensor);
      }
    };
    const Status s =
        ReadChunksDirect(path, blocks, chunks, *windows_,
                         [&](size_t chunk, const char* data, size_t size) {
                           headers_through(chunk_tensor[chunk]);
                           running.AddBytes(data, size);
                         });
    if (s.ok()) {
      headers_through(snapshot.tensors.size());
      *digest = running.hex();
    }
    if (!s.ok()) {
      LOG(WARNING) << "reading " << Where(step, shard) << " from " << path
                   << " directly failed (" << s.ToString()
                   << "); reading it through RocksDB";
    }
    return s.ok();
  }

  // Every chunk through a RocksDB iterator, block checksums verified.
  Status ReadThroughRocksDb(int64_t step,
                            const checkpoint::ShardManifest& manifest,
                            ShardSnapshot* snapshot) {
    const std::string& shard = snapshot->shard;
    rocksdb::ReadOptions read;
    read.verify_checksums = true;
    const std::string prefix = ChunkPrefix(step, shard);
    const std::string end = PrefixEnd(prefix);
    rocksdb::Slice upper(end);
    read.iterate_upper_bound = &upper;
    read.fill_cache = false;
    // NOTE: no readahead_size: each multi-MiB chunk is one block read
    // straight into its buffer; an 8 MiB prefetch buffer added a copy and
    // read at 0.56 GB/s against 0.9 without (bench/checkpoint).
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(read));
    it->Seek(prefix);
    for (int i = 0; i < manifest.tensors_size(); ++i) {
      const checkpoint::TensorManifest& tm = manifest.tensors(i);
      char* out = static_cast<char*>(snapshot->tensors[i].tensor.data());
      uint64_t offset = 0;
      for (int c = 0; c < tm.chunk_xxh3_size(); ++c) {
        const std::string want = ChunkKey(step, shard, i, c);
        const std::string what = Where(step, shard) + ": tensor " + tm.name() +
                                 " chunk " + std::to_string(c);
        if (!it->Valid() || it->key() != want) {
          RETURN_IF_ERROR(ROCKS_STATUS(it->status(), "reading " + what));
          return DataLossError(what + " is missing");
        }
        const rocksdb::Slice v = it->value();
        RETURN_IF_ERROR(CopyCheckpointChunk(
            tm, c, std::string_view(v.data(), v.size()), what, out, &offset));
        it->Next();
      }
      RETURN_IF_ERROR(
          CheckCheckpointTensorComplete(tm, Where(step, shard), offset));
    }
    return ROCKS_STATUS(it->status(), "reading " + Where(step, shard));
  }

  StatusOr<std::vector<checkpoint::ShardManifest>> Manifests(
      std::optional<int64_t> step) override {
    const std::string prefix =
        step ? StepPrefix("manifest", *step) : std::string("manifest/");
    const std::string end = PrefixEnd(prefix);
    rocksdb::Slice upper(end);
    rocksdb::ReadOptions read;
    read.verify_checksums = true;
    read.iterate_upper_bound = &upper;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(read));
    std::vector<checkpoint::ShardManifest> manifests;
    for (it->Seek(prefix); it->Valid(); it->Next()) {
      checkpoint::ShardManifest m;
      if (!m.ParseFromArray(it->value().data(),
                            static_cast<int>(it->value().size()))) {
        return DataLossError("unreadable manifest at key " +
                             it->key().ToString());
      }
      manifests.push_back(std::move(m));
    }
    RETURN_IF_ERROR(ROCKS_STATUS(it->status(), "listing checkpoints"));
    return manifests;
  }

  Status DropSteps(int64_t first, int64_t end) override {
    if (first >= end) return OkStatus();
    rocksdb::WriteBatch batch;
    batch.DeleteRange(StepPrefix("manifest", first),
                      StepPrefix("manifest", end));
    batch.DeleteRange(StepPrefix("ckpt", first), StepPrefix("ckpt", end));
    rocksdb::WriteOptions write;
    write.sync = true;
    RETURN_IF_ERROR(ROCKS_STATUS(db_->Write(write, &batch), "drop steps"));
    // Reclaim the space of files that held only dropped checkpoints (chunk
    // files and manifest files) now, rather than at some later compaction.
    const std::string keys[4] = {
        StepPrefix("ckpt", first), StepPrefix("ckpt", end),
        StepPrefix("manifest", first), StepPrefix("manifest", end)};
    const rocksdb::Slice slices[4] = {keys[0], keys[1], keys[2], keys[3]};
    const rocksdb::RangePtr ranges[2] = {{&slices[0], &slices[1]},
                                         {&slices[2], &slices[3]}};
    return ROCKS_STATUS(rocksdb::DeleteFilesInRanges(
                            db_.get(), db_->DefaultColumnFamily(), ranges, 2),
                        "delete dropped checkpoint files");
  }

  Status VerifyFiles() override {
    rocksdb::ReadOptions read;
    read.verify_checksums = true;
    RETURN_IF_ERROR(ROCKS_STATUS(db_->VerifyFileChecksums(read),
                                 "file checksums in " + dir_));
    return ROCKS_STATUS(db_->VerifyChecksum(read),
                        "block checksums in " + dir_);
  }

 private:
  // Writes the chunk file (synced; none when the snapshot has no bytes)
  // and fills in the manifest's tensors, chunk checksums, total bytes and
  // digest. Each chunk is hashed (its xxh3 and the shard digest) in pieces
  // that stay in cache, just before the writer copies it: one pass over
  // memory for both hashes.
  Status WriteChunks(const ShardSnapshot& snapshot, const std::string& path,
                     checkpoint::ShardManifest* manifest,
                     rocksdb::ExternalSstFileInfo* written) {
    constexpr size_t kHashPiece = size_t{256} << 10;
    std::optional<rocksdb::SstFileWriter> writer;
    Digest digest;
    Xxh3Stream chunk_hash;
    uint64_t total = 0;
    for (size_t i = 0; i < snapshot.tensors.size(); ++i) {
      const NamedTensor& named = snapshot.tensors[i];
      checkpoint::TensorManifest* tm = manifest->add_tensors();
      tm->set_name(named.name);
      tm->set_chunk_bytes(options_.chunk_bytes);
      digest.AddHeader(DigestName(snapshot.shard, named.name), named.tensor);
      if (named.tensor.empty()) continue;
      tm->set_dtype(static_cast<uint32_t>(named.tensor.dtype()));
      for (int64_t d : named.tensor.shape()) tm->add_shape(d);
      const uint64_t bytes = named.tensor.num_bytes();
      tm->set_bytes(bytes);
      total += bytes;
      const char* data = static_cast<const char*>(named.tensor.data());
      for (uint64_t off = 0, c = 0; off < bytes; off += options_.chunk_bytes) {
        const size_t n = std::min<uint64_t>(options_.chunk_bytes, bytes - off);
        chunk_hash.Reset();
        for (size_t p = 0; p < n; p += kHashPiece) {
          const size_t m = std::min(kHashPiece, n - p);
          chunk_hash.Update(data + off + p, m);
          digest.AddBytes(data + off + p, m);
        }
        tm->add_chunk_xxh3(chunk_hash.value());
        if (!writer) {
          writer.emplace(rocksdb::EnvOptions(), chunk_file_options_);
          RETURN_IF_ERROR(ROCKS_STATUS(writer->Open(path), "open " + path));
        }
        RETURN_IF_ERROR(
            ROCKS_STATUS(writer->Put(ChunkKey(snapshot.step, snapshot.shard,
                                              static_cast<int>(i), c++),
                                     rocksdb::Slice(data + off, n)),
                         "write chunk"));
      }
    }
    manifest->set_total_bytes(total);
    manifest->set_digest(digest.hex());
    return writer ? ROCKS_STATUS(writer->Finish(written), "finish " + path)
                  : OkStatus();
  }

  const std::string dir_;
  const std::unique_ptr<rocksdb::Env> env_;  // Outlives db_.
  const rocksdb::Options db_options_;
  const rocksdb::Options chunk_file_options_;
  std::unique_ptr<rocksdb::DB> db_;
  const CheckpointStoreOptions options_;
  std::atomic<uint64_t> counter_{0};
  // Read windows; those of two restores at a time are kept between
  // restores.
  const std::shared_ptr<BufferPool> windows_ =
      BufferPool::Create(2 * (kReadAhead + 1) * kWindowBytes);
};

// Runs work(i) for i in [0, n), `threads` at a time (the caller's thread is
// one of them).
void ParallelFor(size_t n, int threads,
                 const std::function<void(size_t)>& work) {
  std::atomic<size_t> next{0};
  auto run = [&] {
    for (size_t i = next++; i < n; i = next++) work(i);
  };
  std::vector<std::thread> pool;
  const size_t extra =
      n == 0 ? 0 : std::min<size_t>(std::max(threads, 1), n) - 1;
  for (size_t t = 0; t < extra; ++t) {
    pool.push_back(StartNamedThread("sy-storage", run));
  }
  run();
  for (auto& t : pool) t.join();
}

}  // namespace

std::vector<StatusOr<checkpoint::ShardManifest>> WriteShards(
    CheckpointStore& store, const std::vector<ShardSnapshot>& snapshots,
    int threads) {
  std::vector<StatusOr<checkpoint::ShardManifest>> result(
      snapshots.size(), InternalError("not written"));
  ParallelFor(snapshots.size(), threads,
              [&](size_t i) { result[i] = store.WriteShard(snapshots[i]); });
  return result;
}

std::vector<Status> ReadShardsInto(CheckpointStore& store, int64_t step,
                                   std::vector<ShardSnapshot>* into,
                                   int threads) {
  std::vector<Status> result(into->size());
  ParallelFor(into->size(), threads, [&](size_t i) {
    result[i] = store.ReadShardInto(step, (*into)[i].shard, &(*into)[i]);
  });
  return result;
}

std::string SnapshotDigest(const ShardSnapshot& snapshot) {
  Digest digest;
  for (const NamedTensor& t : snapshot.tensors) {
    digest.Add(DigestName(snapshot.shard, t.name), t.tensor);
  }
  return digest.hex();
}

StatusOr<std::unique_ptr<CheckpointStore>> OpenCheckpointStore(
    const std::string& dir, const CheckpointStoreOptions& options) {
  if (options.chunk_bytes == 0 || options.chunk_bytes > (size_t{1} << 30)) {
    return InvalidArgumentError("checkpoint chunk size must be in (0, 1 GiB]");
  }
  // Chunk files with O_DIRECT, unless a test brings its own file system.
  std::unique_ptr<rocksdb::Env> env;
  if (options.file_system != nullptr) {
    env = rocksdb::NewCompositeEnv(options.file_system);
  }
  rocksdb::FileSystem& file_system = options.file_system != nullptr
                                         ? *options.file_system
                                         : *DirectWriteFileSystem();
  // The store's directories survive power loss before anything is written
  // in them (RocksDB does not sync the parent of the database directory).
  for (const char* sub : {"", "/db", "/ingest"}) {
    const Status s = CreateDirDurably(file_system, dir + sub);
    if (!s.ok()) return s.WithContext("opening checkpoint store " + dir);
  }
  // Leftovers of writes a crash interrupted were never ingested.
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir + "/ingest", ec)) {
    fs::remove(entry.path(), ec);
  }
  rocksdb::Options db_options =
      StoreOptions(env != nullptr ? env.get() : DirectWriteEnv());
  db_options.create_if_missing = true;
  rocksdb::DB* raw = nullptr;
  RETURN_IF_ERROR(ROCKS_STATUS(rocksdb::DB::Open(db_options, dir + "/db", &raw),
                               "open checkpoint store " + dir));
  return std::unique_ptr<CheckpointStore>(
      new RocksCheckpointStore(dir, std::move(env), db_options,
                               std::unique_ptr<rocksdb::DB>(raw), options));
}

StatusOr<std::unique_ptr<CheckpointStore>> OpenCheckpointStoreReadOnly(
    const std::string& dir) {
  rocksdb::Options db_options = StoreOptions(DirectWriteEnv());
  rocksdb::DB* raw = nullptr;
  RETURN_IF_ERROR(
      ROCKS_STATUS(rocksdb::DB::OpenForReadOnly(db_options, dir + "/db", &raw),
                   "open checkpoint store " + dir));
  return std::unique_ptr<CheckpointStore>(new RocksCheckpointStore(
      dir, nullptr, db_options, std::unique_ptr<rocksdb::DB>(raw),
      CheckpointStoreOptions()));
}

std::string CheckpointChunkKey(int64_t step, const std::string& shard,
                               int tensor, uint64_t chunk) {
  return ChunkKey(step, shard, tensor, chunk);
}

StatusOr<checkpoint::ShardManifest> ParseShardManifest(
    std::string_view bytes, int64_t step, const std::string& shard) {
  checkpoint::ShardManifest manifest;
  if (!manifest.ParseFromArray(bytes.data(), static_cast<int>(bytes.size())) ||
      manifest.step() != step || manifest.shard() != shard) {
    return DataLossError("the manifest of " + Where(step, shard) +
                         " is unreadable or names another shard");
  }
  if (manifest.format_version() != kCheckpointFormatVersion) {
    return FailedPreconditionError(Where(step, shard) + " has format version " +
                                   std::to_string(manifest.format_version()) +
                                   "; this build reads " +
                                   std::to_string(kCheckpointFormatVersion));
  }
  return manifest;
}

StatusOr<ChunkPlan> PlanShardRead(const checkpoint::ShardManifest& manifest,
                                  bool allocate, ShardSnapshot* snapshot) {
  const int64_t step = snapshot->step;
  const std::string& shard = snapshot->shard;
  if (!allocate && snapshot->tensors.size() !=
                       static_cast<size_t>(manifest.tensors_size())) {
    // Which names differ says more than the counts (a run that turned
    // replication on or off: tensor repl).
    std::set<std::string> stored, wanted;
    for (const auto& tm : manifest.tensors()) stored.insert(tm.name());
    for (const auto& t : snapshot->tensors) wanted.insert(t.name);
    std::string only_stored, only_wanted;
    for (const auto& n : stored) {
      if (!wanted.count(n)) only_stored += " " + n;
    }
    for (const auto& n : wanted) {
      if (!stored.count(n)) only_wanted += " " + n;
    }
    return FailedPreconditionError(
        Where(step, shard) + " has " + std::to_string(manifest.tensors_size()) +
        " tensors, the reader " + std::to_string(snapshot->tensors.size()) +
        (only_stored.empty() ? "" : "; only the checkpoint has" + only_stored) +
        (only_wanted.empty() ? "" : "; only the reader has" + only_wanted) +
        (stored.count("repl") != wanted.count("repl")
             ? " (replication.enabled differs from the run that wrote it)"
             : ""));
  }
  // The tensors, checked against the manifest, and every chunk's place.
  ChunkPlan plan;
  for (int i = 0; i < manifest.tensors_size(); ++i) {
    const checkpoint::TensorManifest& tm = manifest.tensors(i);
    if (allocate) {
      NamedTensor named{tm.name(), Tensor()};
      if (tm.dtype() != 0) {
        auto t = Tensor::Zeros(static_cast<DType>(tm.dtype()),
                               {tm.shape().begin(), tm.shape().end()});
        if (!t.ok() || t->num_bytes() != tm.bytes()) {
          return DataLossError(Where(step, shard) + ": tensor " + tm.name() +
                               " has an inconsistent shape in the manifest");
        }
        named.tensor = std::move(t).value();
      }
      snapshot->tensors.push_back(std::move(named));
    }
    NamedTensor& named = snapshot->tensors[i];
    const Tensor& t = named.tensor;
    const std::vector<int64_t> shape(tm.shape().begin(), tm.shape().end());
    if (named.name != tm.name() || t.empty() != (tm.dtype() == 0) ||
        (!t.empty() && (static_cast<uint32_t>(t.dtype()) != tm.dtype() ||
                        t.shape() != shape))) {
      return FailedPreconditionError(Where(step, shard) + ": tensor " +
                                     tm.name() + " does not fit the reader's " +
                                     named.name);
    }
    // Chunks go into the tensor's bytes: a tensor the shard does not have
    // has none (its data() is null), and the manifest's byte count is the
    // tensor's (found by fuzz/checkpoint_manifest_fuzzer).
    if (t.empty() ? tm.bytes() != 0 || tm.chunk_xxh3_size() != 0
                  : tm.bytes() != t.num_bytes()) {
      return DataLossError(Where(step, shard) + ": tensor " + tm.name() +
                           " has " + std::to_string(tm.bytes()) +
                           " bytes in the manifest; its shape holds " +
                           std::to_string(t.num_bytes()));
    }
    uint64_t offset = 0;
    for (int c = 0; c < tm.chunk_xxh3_size() && plan.consistent; ++c) {
      const uint64_t n = std::min<uint64_t>(
          tm.chunk_bytes(), tm.bytes() - std::min(offset, tm.bytes()));
      plan.consistent = n > 0;
      plan.chunks.push_back({ChunkKey(step, shard, i, c),
                             static_cast<char*>(named.tensor.data()) + offset,
                             n, tm.chunk_xxh3(c)});
      plan.chunk_tensor.push_back(i);
      offset += n;
    }
    plan.consistent = plan.consistent && offset == tm.bytes();
  }
  return plan;
}

Status CopyCheckpointChunk(const checkpoint::TensorManifest& tm, int chunk,
                           std::string_view value, const std::string& what,
                           char* out, uint64_t* offset) {
  if (*offset + value.size() > tm.bytes() ||
      Xxh3(value.data(), value.size()) != tm.chunk_xxh3(chunk)) {
    return DataLossError(what + " does not match its checksum");
  }
  std::memcpy(out + *offset, value.data(), value.size());
  *offset += value.size();
  return OkStatus();
}

Status CheckCheckpointTensorComplete(const checkpoint::TensorManifest& tm,
                                     const std::string& where,
                                     uint64_t offset) {
  if (offset != tm.bytes()) {
    return DataLossError(where + ": tensor " + tm.name() + " has " +
                         std::to_string(offset) + " of " +
                         std::to_string(tm.bytes()) + " bytes");
  }
  return OkStatus();
}

}  // namespace switchyard::storage
