// The checkpoint store on a real RocksDB: round trips, chunking, corruption
// detection (our checksums and RocksDB's), torn writes, range drops, and
// kill -9 at random instants during writes (a child process writing).
#include "storage/checkpoint_store.h"

#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <rocksdb/sst_file_writer.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <set>
#include <thread>

#include "common/digest.h"
#include "storage/direct_write_fs.h"
#include "storage/kv_store.h"
#include "storage/sst_chunk_reader.h"
#include "tests/testing/files.h"

namespace switchyard::storage {
namespace {

namespace fs = std::filesystem;

Tensor Filled(DType dtype, std::vector<int64_t> shape, uint32_t seed) {
  Tensor t = Tensor::Zeros(dtype, std::move(shape)).value();
  std::mt19937 rng(seed);
  auto* bytes = static_cast<uint8_t*>(t.data());
  for (size_t i = 0; i < t.num_bytes(); ++i) bytes[i] = rng() & 0xff;
  return t;
}

ShardSnapshot Snapshot(const std::string& shard, int64_t step) {
  ShardSnapshot s;
  s.shard = shard;
  s.step = step;
  s.epoch = 3;
  const uint32_t seed = static_cast<uint32_t>(step * 131 + shard.size());
  s.tensors.push_back({"w1", Filled(DType::kF32, {64, 48}, seed)});
  s.tensors.push_back({"b1", Tensor()});  // A tensor the shard lacks.
  s.tensors.push_back({"w2", Filled(DType::kBF16, {48, 64}, seed + 1)});
  s.tensors.push_back({"opt.w1.m", Filled(DType::kF32, {64, 48}, seed + 2)});
  return s;
}

bool SameBytes(const Tensor& a, const Tensor& b) {
  if (a.empty() || b.empty()) return a.empty() == b.empty();
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.data(), b.data(), a.num_bytes()) == 0;
}

void ExpectSame(const ShardSnapshot& a, const ShardSnapshot& b) {
  EXPECT_EQ(a.shard, b.shard);
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.epoch, b.epoch);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    EXPECT_EQ(a.tensors[i].name, b.tensors[i].name);
    EXPECT_TRUE(SameBytes(a.tensors[i].tensor, b.tensors[i].tensor))
        << a.tensors[i].name;
  }
}

class CheckpointStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/switchyard_ckpt_" +
           std::to_string(::getpid()) + "_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<CheckpointStore> Open(size_t chunk_bytes = 1000) {
    CheckpointStoreOptions o;
    o.chunk_bytes = chunk_bytes;  // Small: every tensor spans chunks.
    auto store = OpenCheckpointStore(dir_, o);
    EXPECT_TRUE(store.ok()) << store.status().ToString();
    return store.ok() ? std::move(store).value() : nullptr;
  }

  std::string dir_;
};

TEST_F(CheckpointStoreTest, RoundTripsAcrossReopen) {
  const ShardSnapshot a = Snapshot("L0.E1.S0", 7), d = Snapshot("D0", 7);
  {
    auto store = Open();
    auto m = store->WriteShard(a);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    EXPECT_EQ(m->digest(), SnapshotDigest(a));
    EXPECT_EQ(m->tensors(0).chunk_xxh3_size(), 13);  // 12288 B / 1000 B.
    EXPECT_EQ(m->total_bytes(), 2u * 12288 + 6144);
    ASSERT_TRUE(store->WriteShard(d).ok());
  }
  auto store = Open();  // Another process opening the directory later.
  auto back = store->ReadShard(7, "L0.E1.S0");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  ExpectSame(*back, a);
  auto manifests = store->Manifests(std::nullopt);
  ASSERT_TRUE(manifests.ok());
  ASSERT_EQ(manifests->size(), 2u);
  EXPECT_EQ((*manifests)[0].shard(), "D0");  // Ordered by (step, shard).
  EXPECT_EQ((*manifests)[1].shard(), "L0.E1.S0");
  auto missing = store->ReadShard(8, "L0.E1.S0");
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("L0.E1.S0 at step 8"),
            std::string::npos);
}

TEST_F(CheckpointStoreTest, ReadsIntoCallerTensors) {
  auto store = Open();
  const ShardSnapshot s = Snapshot("L0.E2.S0", 3);
  ASSERT_TRUE(store->WriteShard(s).ok());
  // A destination shaped like the shard (a worker's live tensors).
  ShardSnapshot into = s;
  for (auto& t : into.tensors) {
    if (!t.tensor.empty()) {
      t.tensor = Tensor::Zeros(t.tensor.dtype(), t.tensor.shape()).value();
    }
  }
  const void* before = into.tensors[0].tensor.data();
  ASSERT_TRUE(store->ReadShardInto(3, "L0.E2.S0", &into).ok());
  EXPECT_EQ(into.tensors[0].tensor.data(), before) << "no new allocation";
  ExpectSame(into, s);
  // A destination of another shape is refused, naming the tensor.
  into.tensors[2].tensor = Tensor::Zeros(DType::kBF16, {48, 63}).value();
  Status wrong = store->ReadShardInto(3, "L0.E2.S0", &into);
  EXPECT_EQ(wrong.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(wrong.message().find("tensor w2 does not fit"), std::string::npos)
      << wrong.message();
  // A reader with one more tensor (a run that turned replication on after
  // this checkpoint) is told which.
  into.tensors[2].tensor =
      Tensor::Zeros(s.tensors[2].tensor.dtype(), s.tensors[2].tensor.shape())
          .value();
  into.tensors.push_back({"repl", Tensor::Zeros(DType::kF32, {3}).value()});
  Status more = store->ReadShardInto(3, "L0.E2.S0", &into);
  EXPECT_EQ(more.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(more.message().find("only the reader has repl (replication."
                                "enabled differs from the run that wrote it)"),
            std::string::npos)
      << more.message();
}

TEST_F(CheckpointStoreTest, WritesAndReadsManyShardsConcurrently) {
  auto store = Open();
  std::vector<ShardSnapshot> written, into;
  for (int e = 0; e < 7; ++e) {
    written.push_back(Snapshot("L1.E" + std::to_string(e) + ".S0", 4));
  }
  const auto manifests = WriteShards(*store, written, 3);
  ASSERT_EQ(manifests.size(), written.size());
  for (size_t i = 0; i < written.size(); ++i) {
    ASSERT_TRUE(manifests[i].ok()) << manifests[i].status().ToString();
    EXPECT_EQ(manifests[i]->shard(), written[i].shard);
    EXPECT_EQ(manifests[i]->digest(), SnapshotDigest(written[i]));
  }
  EXPECT_EQ(store->Manifests(4)->size(), written.size());
  // Destinations shaped like the shards, plus one shard never written.
  into = written;
  into.push_back(Snapshot("L1.E9.S0", 4));
  for (auto& shard : into) {
    for (auto& t : shard.tensors) {
      if (!t.tensor.empty()) {
        t.tensor = Tensor::Zeros(t.tensor.dtype(), t.tensor.shape()).value();
      }
    }
  }
  for (int threads : {1, 3, 16}) {
    const std::vector<Status> read = ReadShardsInto(*store, 4, &into, threads);
    ASSERT_EQ(read.size(), into.size());
    for (size_t i = 0; i < written.size(); ++i) {
      ASSERT_TRUE(read[i].ok()) << read[i].ToString();
      ExpectSame(into[i], written[i]);
    }
    EXPECT_EQ(read.back().code(), StatusCode::kNotFound) << threads;
  }
}

TEST_F(CheckpointStoreTest, RewritingAShardReplacesIt) {
  auto store = Open();
  ShardSnapshot s = Snapshot("D1", 4);
  ASSERT_TRUE(store->WriteShard(s).ok());
  s.tensors[0].tensor = Filled(DType::kF32, {64, 48}, 999);
  ASSERT_TRUE(store->WriteShard(s).ok());
  auto back = store->ReadShard(4, "D1");
  ASSERT_TRUE(back.ok());
  ExpectSame(*back, s);
  EXPECT_EQ(store->Manifests(4)->size(), 1u);
  // The second write overlaps the first, so its files get a newer sequence
  // number: kept in RocksDB's MANIFEST, not written into the files, whose
  // file checksums still hold.
  EXPECT_TRUE(store->VerifyFiles().ok());
}

TEST_F(CheckpointStoreTest, AChunkThatDoesNotMatchItsChecksumIsDataLoss) {
  {
    auto store = Open();
    ASSERT_TRUE(store->WriteShard(Snapshot("L2.E5.S1", 9)).ok());
  }
  // Bytes changed behind the store's back (RocksDB's own checksums are
  // consistent: only the manifest's can tell).
  ASSERT_TRUE(testing::FlipStoredByte(dir_ + "/db", "ckpt/", 17, 0x01).ok());
  auto store = Open();
  auto r = store->ReadShard(9, "L2.E5.S1");
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(r.status().message().find(
                "L2.E5.S1 at step 9: tensor w1 chunk 0 does not match its "
                "checksum"),
            std::string::npos)
      << r.status().message();
}

TEST_F(CheckpointStoreTest, AFlippedByteOnDiskIsDetected) {
  {
    auto store = Open(size_t{1} << 20);
    ASSERT_TRUE(store->WriteShard(Snapshot("L1.E0.S0", 5)).ok());
  }
  // Flip one byte in the middle of the ingested chunk file (tensor data;
  // the manifest is in a small file of its own).
  fs::path sst;
  for (const auto& e : fs::directory_iterator(dir_ + "/db")) {
    if (e.path().extension() == ".sst" &&
        (sst.empty() || fs::file_size(e.path()) > fs::file_size(sst))) {
      sst = e.path();
    }
  }
  ASSERT_FALSE(sst.empty());
  ASSERT_GT(fs::file_size(sst), 4000u);
  {
    std::fstream f(sst, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(4000);
    char c = 0;
    f.read(&c, 1);
    c ^= 0x40;
    f.seekp(4000);
    f.write(&c, 1);
  }
  auto store = Open(size_t{1} << 20);
  auto r = store->ReadShard(5, "L1.E0.S0");
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss) << r.status().ToString();
  EXPECT_NE(r.status().message().find("L1.E0.S0 at step 5"), std::string::npos)
      << r.status().message();
  // The file checksum finds it too, naming the file.
  Status verified = store->VerifyFiles();
  EXPECT_EQ(verified.code(), StatusCode::kDataLoss) << verified.ToString();
  EXPECT_NE(verified.message().find(sst.filename().string()), std::string::npos)
      << verified.message();
}

// Every SST file carries the xxh3-64 of all its bytes as its RocksDB file
// checksum (checked here by an independent hash of the file), and
// VerifyFiles reads each file back against it: a flipped byte is found
// even where no read would look.
TEST_F(CheckpointStoreTest, FileChecksumsCoverEveryByteOfEveryFile) {
  {
    auto store = Open(size_t{1} << 20);
    ASSERT_TRUE(store->WriteShard(Snapshot("L1.E0.S0", 5)).ok());
    ASSERT_TRUE(store->WriteShard(Snapshot("L1.E1.S0", 5)).ok());
    EXPECT_TRUE(store->VerifyFiles().ok());
  }
  std::vector<rocksdb::LiveFileMetaData> files;
  rocksdb::TablePropertiesCollection tables;
  {
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(
        rocksdb::DB::OpenForReadOnly(rocksdb::Options(), dir_ + "/db", &raw)
            .ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    db->GetLiveFilesMetaData(&files);
    ASSERT_TRUE(db->GetPropertiesOfAllTables(&tables).ok());
  }
  ASSERT_EQ(files.size(), 4u);  // A chunk file and a manifest file each.
  for (const auto& f : files) {
    SCOPED_TRACE(f.name);
    EXPECT_EQ(f.file_checksum_func_name, "switchyard.xxh3-64");
    std::ifstream in(f.db_path + f.name, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)),
                            std::istreambuf_iterator<char>());
    ASSERT_EQ(bytes.size(), f.size);
    const uint64_t hash = Xxh3(bytes.data(), bytes.size());
    ASSERT_EQ(f.file_checksum.size(), sizeof(hash));
    EXPECT_EQ(std::memcmp(f.file_checksum.data(), &hash, sizeof(hash)), 0);
  }
  // The last byte of the first data block's trailer in a chunk file: a
  // block checksum field, which chunk files leave unused, so no read looks
  // at it and only the file checksum covers it.
  std::string path, name;
  std::set<uint64_t> offsets;
  for (const auto& f : files) {
    auto props = tables.find(f.db_path + f.name);
    ASSERT_NE(props, tables.end());
    auto blocks = ParseChunkBlocks(
        props->second->user_collected_properties.at(kChunkBlocksProperty));
    ASSERT_TRUE(blocks.ok());
    if (blocks->size() < 2) continue;  // A manifest file.
    for (const auto& [key, offset] : *blocks) offsets.insert(offset);
    path = f.db_path + f.name;
    name = f.name.substr(1);  // Without the leading '/'.
    break;
  }
  ASSERT_GE(offsets.size(), 2u);
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    const std::streamoff at =
        static_cast<std::streamoff>(*std::next(offsets.begin())) - 1;
    f.seekg(at);
    char c = 0;
    f.read(&c, 1);
    c ^= 0x10;
    f.seekp(at);
    f.write(&c, 1);
  }
  auto store = Open(size_t{1} << 20);
  EXPECT_TRUE(store->ReadShard(5, "L1.E0.S0").ok());
  EXPECT_TRUE(store->ReadShard(5, "L1.E1.S0").ok());
  Status verified = store->VerifyFiles();
  EXPECT_EQ(verified.code(), StatusCode::kDataLoss) << verified.ToString();
  EXPECT_NE(verified.message().find(name), std::string::npos)
      << verified.message();
}

// Restores read chunks straight from their SST file (sst_chunk_reader.h),
// whether chunks fill blocks of their own (1 MiB) or share blocks with
// prefix-compressed keys (1000 B, under RocksDB's 4 KiB blocks), and give
// the bytes the RocksDB iterator gives.
TEST_F(CheckpointStoreTest, RestoresReadChunksStraightFromTheirFile) {
  for (size_t chunk : {size_t{1000}, size_t{1} << 20}) {
    SCOPED_TRACE(chunk);
    fs::remove_all(dir_);
    std::vector<ShardSnapshot> written;
    {
      auto store = Open(chunk);
      for (int e = 0; e < 4; ++e) {
        ShardSnapshot s = Snapshot("L0.E" + std::to_string(e) + ".S0", 6);
        // A tensor of 16 MiB, more than the windows read at once, so a
        // restore reuses windows and a 1 MiB chunk spans windows.
        s.tensors.push_back(
            {"opt.w1.v", Filled(DType::kF32, {1024, 4100}, 40 + e)});
        ASSERT_TRUE(store->WriteShard(s).ok());
        written.push_back(std::move(s));
      }
    }
    auto store = Open(chunk);  // Reopened: what a restarted worker does.
    const ShardReadCounts before = GetShardReadCounts();
    std::vector<ShardSnapshot> into = written;
    for (auto& shard : into) {
      for (auto& t : shard.tensors) {
        if (!t.tensor.empty()) {
          t.tensor = Tensor::Zeros(t.tensor.dtype(), t.tensor.shape()).value();
        }
      }
    }
    for (const Status& s : ReadShardsInto(*store, 6, &into, 2)) {
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
    auto one = store->ReadShard(6, "L0.E2.S0");
    ASSERT_TRUE(one.ok()) << one.status().ToString();
    const ShardReadCounts after = GetShardReadCounts();
    EXPECT_EQ(after.direct - before.direct, 5u);
    EXPECT_EQ(after.through_rocksdb, before.through_rocksdb);
    for (size_t i = 0; i < written.size(); ++i) ExpectSame(into[i], written[i]);
    ExpectSame(*one, written[2]);
  }
}

// The fast path only reads what RocksDB would return: a chunk rewritten
// through the memtable (here a flipped byte put behind the store's back)
// sends the read through RocksDB, which sees the new value.
TEST_F(CheckpointStoreTest, ANewerCopyOfAChunkElsewhereTakesTheRocksDbPath) {
  {
    auto store = Open();
    ASSERT_TRUE(store->WriteShard(Snapshot("L2.E1.S0", 4)).ok());
  }
  ASSERT_TRUE(testing::FlipStoredByte(dir_ + "/db", "ckpt/", 5, 0x08).ok());
  auto store = Open();
  const ShardReadCounts before = GetShardReadCounts();
  auto r = store->ReadShard(4, "L2.E1.S0");
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  const ShardReadCounts after = GetShardReadCounts();
  EXPECT_EQ(after.direct, before.direct);
  EXPECT_EQ(after.through_rocksdb - before.through_rocksdb, 1u);
}

// Direct reads check what they find: a wrong block offset or a property
// that does not parse is an error, never wrong bytes.
TEST_F(CheckpointStoreTest, DirectReadsRefuseWhatDoesNotMatch) {
  const ShardSnapshot s = Snapshot("D3", 2);
  {
    auto store = Open();
    ASSERT_TRUE(store->WriteShard(s).ok());
  }
  fs::path sst;
  for (const auto& e : fs::directory_iterator(dir_ + "/db")) {
    if (e.path().extension() == ".sst" &&
        (sst.empty() || fs::file_size(e.path()) > fs::file_size(sst))) {
      sst = e.path();
    }
  }
  const std::string key = "ckpt/0000000000000002/D3/0000/00000000";
  Tensor dst = Tensor::Zeros(DType::kF32, {250}).value();
  const ChunkTarget target{key, static_cast<char*>(dst.data()), 1000,
                           Xxh3(s.tensors[0].tensor.data(), 1000)};
  auto pool = BufferPool::Create(0);
  BufferPool& windows = *pool;
  EXPECT_TRUE(
      ReadChunksDirect(sst.string(), {{key, 0}}, {target}, windows).ok());
  EXPECT_EQ(std::memcmp(dst.data(), s.tensors[0].tensor.data(), 1000), 0);
  EXPECT_EQ(
      ReadChunksDirect(sst.string(), {{key, 7}}, {target}, windows).code(),
      StatusCode::kDataLoss);
  EXPECT_EQ(ReadChunksDirect(sst.string(), {}, {target}, windows).code(),
            StatusCode::kNotFound);
  ChunkTarget wrong_sum = target;
  wrong_sum.xxh3 ^= 1;
  EXPECT_EQ(
      ReadChunksDirect(sst.string(), {{key, 0}}, {wrong_sum}, windows).code(),
      StatusCode::kDataLoss);
  ChunkTarget wrong_size = target;
  wrong_size.bytes = 999;
  EXPECT_EQ(
      ReadChunksDirect(sst.string(), {{key, 0}}, {wrong_size}, windows).code(),
      StatusCode::kDataLoss);
  EXPECT_EQ(
      ReadChunksDirect(dir_ + "/no-such.sst", {{key, 0}}, {target}, windows)
          .code(),
      StatusCode::kUnavailable);
  EXPECT_EQ(ParseChunkBlocks(std::string("\x05"
                                         "ab",
                                         3))
                .status()
                .code(),
            StatusCode::kInvalidArgument);
  auto parsed =
      ParseChunkBlocks(std::string("\x01"
                                   "k\x85\x01",
                                   4));
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->at("k"), 133u);
}

// A store written before chunk files and manifests were split, and before
// the chunk block property: one SST with chunks and manifest, no property.
// It still reads, through RocksDB's iterator.
TEST_F(CheckpointStoreTest, AStoreFromBeforeTheChunkPropertyStillReads) {
  const ShardSnapshot s = Snapshot("L3.E2.S1", 8);
  const std::string old_layout = dir_ + "_old.sst";
  {
    auto store = Open();
    ASSERT_TRUE(store->WriteShard(s).ok());
  }
  {
    // Every key and value of the store, into one SST built without the
    // store's options.
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(
        rocksdb::DB::OpenForReadOnly(rocksdb::Options(), dir_ + "/db", &raw)
            .ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    rocksdb::SstFileWriter writer{rocksdb::EnvOptions(), rocksdb::Options()};
    ASSERT_TRUE(writer.Open(old_layout).ok());
    std::unique_ptr<rocksdb::Iterator> it(
        db->NewIterator(rocksdb::ReadOptions()));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      ASSERT_TRUE(writer.Put(it->key(), it->value()).ok());
    }
    ASSERT_TRUE(writer.Finish().ok());
  }
  fs::remove_all(dir_);
  { ASSERT_NE(Open(), nullptr); }  // An empty store.
  {
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(rocksdb::Options(), dir_ + "/db", &raw).ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    ASSERT_TRUE(db->IngestExternalFile({old_layout},
                                       rocksdb::IngestExternalFileOptions())
                    .ok());
  }
  fs::remove(old_layout);
  auto store = Open();
  const ShardReadCounts before = GetShardReadCounts();
  auto back = store->ReadShard(8, "L3.E2.S1");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  ExpectSame(*back, s);
  const ShardReadCounts after = GetShardReadCounts();
  EXPECT_EQ(after.direct, before.direct);
  EXPECT_EQ(after.through_rocksdb - before.through_rocksdb, 1u);
  // Its file has no file checksum; its block checksums still verify.
  EXPECT_TRUE(store->VerifyFiles().ok());
}

// Chunk files are written with O_DIRECT in 16 MiB pieces
// (direct_write_fs.h): unaligned tails, a sync in the middle (the tail is
// written padded, then rewritten by later appends) and a write across the
// buffers leave exactly the bytes appended.
TEST_F(CheckpointStoreTest, DirectWritesLeaveExactlyTheBytesAppended) {
  fs::create_directories(dir_);
  const std::string path = dir_ + "/x" + kDirectWriteSuffix;
  std::unique_ptr<rocksdb::FSWritableFile> file;
  auto fs = DirectWriteEnv()->GetFileSystem();
  ASSERT_TRUE(
      fs->NewWritableFile(path, rocksdb::FileOptions(), &file, nullptr).ok());
  std::string want;
  std::mt19937 rng(5);
  auto append = [&](size_t n) {
    std::string piece(n, '\0');
    for (char& c : piece) c = static_cast<char>(rng());
    want += piece;
    return file->Append(piece, rocksdb::IOOptions(), nullptr);
  };
  ASSERT_TRUE(append(5000).ok());
  ASSERT_TRUE(file->Sync(rocksdb::IOOptions(), nullptr).ok());
  EXPECT_EQ(fs::file_size(path), 5000u);
  ASSERT_TRUE(append((size_t{33} << 20) + 3).ok());
  ASSERT_TRUE(append(1).ok());
  EXPECT_EQ(file->GetFileSize(rocksdb::IOOptions(), nullptr), want.size());
  ASSERT_TRUE(file->Close(rocksdb::IOOptions(), nullptr).ok());
  file.reset();
  std::ifstream in(path, std::ios::binary);
  const std::string got((std::istreambuf_iterator<char>(in)),
                        std::istreambuf_iterator<char>());
  EXPECT_EQ(got.size(), want.size());
  EXPECT_TRUE(got == want);
}

TEST_F(CheckpointStoreTest, ChunksWithoutAManifestAreNotACheckpoint) {
  {
    auto store = Open();
    ASSERT_TRUE(store->WriteShard(Snapshot("D0", 1)).ok());
  }
  {
    // A torn write: chunks of step 2, no manifest.
    auto kv = OpenRocksKvStore(dir_ + "/db");
    ASSERT_TRUE(kv.ok());
    ASSERT_TRUE(
        (*kv)
            ->Put("ckpt/0000000000000002/D0/0000/00000000", "partial", true)
            .ok());
  }
  auto store = Open();
  EXPECT_EQ(store->ReadShard(2, "D0").status().code(), StatusCode::kNotFound);
  auto manifests = store->Manifests(std::nullopt);
  ASSERT_TRUE(manifests.ok());
  ASSERT_EQ(manifests->size(), 1u);
  EXPECT_EQ((*manifests)[0].step(), 1);
}

TEST_F(CheckpointStoreTest, DropStepsRemovesWholeCheckpoints) {
  auto store = Open();
  for (int64_t step : {10, 20, 30}) {
    for (const char* shard : {"D0", "L0.E0.S0"}) {
      ASSERT_TRUE(store->WriteShard(Snapshot(shard, step)).ok());
    }
  }
  ASSERT_TRUE(store->DropSteps(0, 30).ok());
  auto manifests = store->Manifests(std::nullopt);
  ASSERT_TRUE(manifests.ok());
  ASSERT_EQ(manifests->size(), 2u);
  for (const auto& m : *manifests) EXPECT_EQ(m.step(), 30);
  EXPECT_EQ(store->ReadShard(20, "D0").status().code(), StatusCode::kNotFound);
  auto kept = store->ReadShard(30, "L0.E0.S0");
  ASSERT_TRUE(kept.ok());
  ExpectSame(*kept, Snapshot("L0.E0.S0", 30));
}

TEST_F(CheckpointStoreTest, BadInputIsRefused) {
  auto store = Open();
  EXPECT_EQ(store->WriteShard(Snapshot("a/b", 1)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(store->WriteShard(Snapshot("D0", -1)).status().code(),
            StatusCode::kInvalidArgument);
  CheckpointStoreOptions zero;
  zero.chunk_bytes = 0;
  EXPECT_EQ(OpenCheckpointStore(dir_ + "x", zero).status().code(),
            StatusCode::kInvalidArgument);
}

// A real full disk: the store on a small tmpfs. Writes that do not fit fail
// with RESOURCE_EXHAUSTED and leave nothing behind; what was written before
// stays readable; once space is freed, writes work again. Needs mount(2)
// (root, as on the CI machines); elsewhere the fault-injection test in
// worker_service_restore_test covers the worker's side.
TEST_F(CheckpointStoreTest, AFullDiskFailsWritesAndKeepsWhatWasThere) {
  const std::string mnt = dir_ + "_tmpfs";
  fs::create_directories(mnt);
  const std::string mount_cmd =
      "mount -t tmpfs -o size=4m tmpfs " + mnt + " 2>/dev/null";
  if (std::system(mount_cmd.c_str()) != 0) {
    fs::remove_all(mnt);
    GTEST_SKIP() << "cannot mount a tmpfs here (not root)";
  }
  {
    CheckpointStoreOptions o;
    o.chunk_bytes = 4096;
    auto store = OpenCheckpointStore(mnt + "/store", o);
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    ASSERT_TRUE((*store)->WriteShard(Snapshot("D0", 1)).ok());
    // Fill the disk, leaving less room than one checkpoint of a shard.
    {
      std::ofstream filler(mnt + "/filler", std::ios::binary);
      std::vector<char> block(64 * 1024, 'x');
      while (filler.write(block.data(), block.size())) {
      }
    }
    auto full = (*store)->WriteShard(Snapshot("D0", 2));
    EXPECT_EQ(full.status().code(), StatusCode::kResourceExhausted)
        << full.status().ToString();
    EXPECT_NE(full.status().message().find("D0 at step 2"), std::string::npos)
        << full.status().message();
    auto kept = (*store)->ReadShard(1, "D0");
    ASSERT_TRUE(kept.ok()) << kept.status().ToString();
    ExpectSame(*kept, Snapshot("D0", 1));
    EXPECT_EQ((*store)->ReadShard(2, "D0").status().code(),
              StatusCode::kNotFound);
    fs::remove(mnt + "/filler");
    auto again = (*store)->WriteShard(Snapshot("D0", 3));
    EXPECT_TRUE(again.ok()) << again.status().ToString();
  }
  std::system(("umount " + mnt).c_str());
  fs::remove_all(mnt);
}

// The child of the crash test: writes the steps after the last one in
// DIR/done (two shards each) and appends "<step>\n" to DIR/done once both
// are written.
int CrashWriter(const std::string& dir) {
  CheckpointStoreOptions o;
  o.chunk_bytes = 4096;
  auto store = OpenCheckpointStore(dir, o);
  if (!store.ok()) return 1;
  int64_t first = 0;
  std::ifstream in(dir + "/done");
  for (int64_t s; in >> s;) first = s + 1;
  for (int64_t step = first;; ++step) {
    for (const char* shard : {"D0", "L0.E0.S0"}) {
      if (!(*store)->WriteShard(Snapshot(shard, step)).ok()) return 1;
    }
    std::ofstream(dir + "/done", std::ios::app) << step << "\n" << std::flush;
  }
}

TEST_F(CheckpointStoreTest, KillNineAtAnyInstantLeavesWholeCheckpoints) {
  const char* chaos = std::getenv("SWITCHYARD_CHAOS_ITERATIONS");
  const int iterations = chaos ? std::atoi(chaos) : 20;
  std::mt19937 rng(2026);
  size_t total_done = 0;
  using Clock = std::chrono::steady_clock;
  auto steps_done = [this] {
    std::ifstream in(dir_ + "/done");
    return std::distance(std::istream_iterator<int64_t>(in), {});
  };
  for (int i = 0; i < iterations; ++i) {
    const auto done_before = steps_done();
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::execl("/proc/self/exe", "checkpoint_store_test", "--crash-writer",
              dir_.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    // Killed at random in the write loop, once a step is done (slow starts).
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    while (steps_done() == done_before && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 200));
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    // Steps reported done are present; everything listed reads whole.
    std::set<int64_t> done;
    std::ifstream in(dir_ + "/done");
    for (int64_t s; in >> s;) done.insert(s);
    auto store = Open();
    ASSERT_NE(store, nullptr);
    auto manifests = store->Manifests(std::nullopt);
    ASSERT_TRUE(manifests.ok()) << manifests.status().ToString();
    std::set<int64_t> listed;
    for (const auto& m : *manifests) {
      auto r = store->ReadShard(m.step(), m.shard());
      ASSERT_TRUE(r.ok()) << "iteration " << i << ": " << r.status().ToString();
      ExpectSame(*r, Snapshot(m.shard(), m.step()));
      listed.insert(m.step());
    }
    for (int64_t s : done) {
      EXPECT_TRUE(listed.count(s))
          << "iteration " << i << ": step " << s << " was durable but is gone";
    }
    total_done = done.size();
  }
  // The writers got far enough for the kills to land mid-write.
  EXPECT_GT(total_done, static_cast<size_t>(iterations)) << "too few writes";
}

}  // namespace
}  // namespace switchyard::storage

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--crash-writer") == 0) {
    return switchyard::storage::CrashWriter(argv[2]);
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
