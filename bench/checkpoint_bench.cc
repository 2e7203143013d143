// bench/checkpoint: checkpoint write and restore bandwidth against raw
// sequential I/O on the same disk, in the same run.
//
// Writes --gib GiB of shard checkpoints (64 MiB tensors, shards of 256 MiB)
// with WriteShards, evicts them from the page cache (posix_fadvise
// DONTNEED on every file), and reads them back with ReadShardsInto into
// allocated tensors, as a worker restores into its live shards (every chunk
// checksummed). Both move --threads shards at a time (default one per
// core, as a worker does). Baseline: the
// same bytes written to one file with O_DIRECT and fsync, and read back with
// O_DIRECT (what `dd oflag=direct` / `iflag=direct` measure). Each of
// --rounds rounds runs between two raw runs (raw, store, raw, store, ...,
// raw) and is set against their average. Prints every round's GB/s and
// ratio and the median ratio (targets: >= 0.7 for both, issue 5).
//
// usage: checkpoint_bench [--gib N] [--dir DIR] [--threads N] [--rounds N]
//        (default 2 GiB in /tmp, one thread per core, 3 rounds)
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "storage/checkpoint_store.h"
#include "storage/sst_chunk_reader.h"

namespace switchyard::storage {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr size_t kTensorBytes = size_t{64} << 20;
constexpr int kTensorsPerShard = 4;

double Seconds(Clock::time_point a) {
  return std::chrono::duration<double>(Clock::now() - a).count();
}

// Drops every file under `dir` from the page cache.
void Evict(const std::string& dir) {
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const int fd = ::open(e.path().c_str(), O_RDONLY);
    if (fd < 0) continue;
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

// Both raw baselines use 16 MiB blocks in a tensor's memory: 2 MiB aligned,
// huge pages (AllocateTensorMemory), the best buffer for direct I/O; into
// scattered 4 KiB pages the same reads and writes ran about three times
// slower here.
constexpr size_t kRawBlock = size_t{16} << 20;
Tensor RawBlock() {
  return Tensor::Zeros(DType::kF32, {kRawBlock / sizeof(float)}).value();
}

// O_DIRECT sequential write (then fsync) of `bytes` to `path`. GB/s.
double RawDirectWrite(const std::string& path, size_t bytes,
                      const Tensor& pattern) {
  Tensor block = RawBlock();
  std::memcpy(block.data(), pattern.data(), kRawBlock);
  const int fd =
      ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  if (fd < 0) {
    std::perror("open O_DIRECT");
    return 0;
  }
  const auto start = Clock::now();
  for (size_t done = 0; done < bytes; done += kRawBlock) {
    if (::write(fd, block.data(), kRawBlock) !=
        static_cast<ssize_t>(kRawBlock)) {
      break;
    }
  }
  ::fsync(fd);
  ::close(fd);
  return bytes / Seconds(start) / 1e9;
}

// O_DIRECT sequential read, in 16 MiB blocks, of every SST file under
// `dir`: the store's own bytes where they lie on disk. GB/s.
double RawReadFiles(const std::string& dir) {
  Tensor block = RawBlock();
  size_t total = 0;
  const auto start = Clock::now();
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file() || e.path().extension() != ".sst") continue;
    const int fd = ::open(e.path().c_str(), O_RDONLY | O_DIRECT);
    if (fd < 0) continue;
    for (ssize_t n; (n = ::read(fd, block.data(), kRawBlock)) > 0;) total += n;
    ::close(fd);
  }
  return total / Seconds(start) / 1e9;
}

// One line per direction: every round's store and raw GB/s and ratio,
// then the median ratio, the figure the target is read against.
void PrintRounds(const char* what, const std::vector<double>& store,
                 const std::vector<double>& raw,
                 const std::vector<double>& ratios) {
  std::printf("  %-5s rounds:", what);
  for (size_t r = 0; r < ratios.size(); ++r) {
    std::printf(" %.2f/%.2f=%.2f", store[r], (raw[r] + raw[r + 1]) / 2,
                ratios[r]);
  }
  std::vector<double> sorted = ratios;
  std::sort(sorted.begin(), sorted.end());
  std::printf(" (store/raw GB/s)\n  %-5s median ratio %.2f (target >= 0.7)\n",
              what, sorted[sorted.size() / 2]);
}

int Run(int argc, char** argv) {
  double gib = 2;
  std::string base = fs::temp_directory_path().string();
  int threads = static_cast<int>(std::thread::hardware_concurrency());
  int rounds = 3;
  const char* usage =
      "usage: checkpoint_bench [--gib N] [--dir DIR] [--threads N] "
      "[--rounds N]\n"
      "  Writes and restores N GiB (default 2) of checkpoint in 64 MiB\n"
      "  tensors through the checkpoint store in DIR (default the temp\n"
      "  directory), N shards at a time (default: the cores), against raw\n"
      "  O_DIRECT writes and reads of the same bytes on the same disk.\n"
      "  Each of N rounds (default 3) writes, then restores, between two\n"
      "  raw runs; the median round's ratio is the result.\n";
  for (int i = 1; i < argc; i += 2) {
    const bool has_value = i + 1 < argc;
    if (std::strcmp(argv[i], "--help") == 0) {
      std::printf("%s", usage);
      return 0;
    } else if (has_value && std::strcmp(argv[i], "--gib") == 0) {
      gib = std::atof(argv[i + 1]);
    } else if (has_value && std::strcmp(argv[i], "--dir") == 0) {
      base = argv[i + 1];
    } else if (has_value && std::strcmp(argv[i], "--threads") == 0) {
      threads = std::atoi(argv[i + 1]);
    } else if (has_value && std::strcmp(argv[i], "--rounds") == 0) {
      rounds = std::atoi(argv[i + 1]);
    } else {
      std::fprintf(stderr, "unknown or incomplete flag '%s'\n%s", argv[i],
                   usage);
      return 2;
    }
  }
  if (!(gib > 0) || threads < 1 || rounds < 1) {
    std::fprintf(stderr, "--gib, --threads and --rounds must be positive\n%s",
                 usage);
    return 2;
  }
  const std::string dir =
      base + "/checkpoint_bench." + std::to_string(::getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  const size_t total = static_cast<size_t>(gib * (size_t{1} << 30));
  const int shards = std::max<int>(
      1, static_cast<int>(total / (kTensorBytes * kTensorsPerShard)));
  const size_t bytes = size_t{1} * shards * kTensorsPerShard * kTensorBytes;

  // One 64 MiB pattern (random, so nothing compresses), shared by tensors.
  Tensor pattern =
      Tensor::Zeros(DType::kF32, {static_cast<int64_t>(kTensorBytes / 4)})
          .value();
  std::mt19937 rng(7);
  for (int64_t i = 0; i < pattern.num_elements(); ++i) {
    pattern.f32()[i] = static_cast<float>(rng()) / 1e9f;
  }
  std::vector<ShardSnapshot> snapshots;
  for (int s = 0; s < shards; ++s) {
    ShardSnapshot snap;
    snap.shard = "L0.E" + std::to_string(s) + ".S0";
    snap.step = 100;
    for (int t = 0; t < kTensorsPerShard; ++t) {
      snap.tensors.push_back({"t" + std::to_string(t), pattern});
    }
    snapshots.push_back(std::move(snap));
  }

  // Rounds alternate with the baseline (raw, store, raw, store, ..., raw)
  // and each round's ratio takes the raw runs on both sides of it,
  // averaged, so that a spell of the shared disk being faster or slower
  // weighs on both sides alike; the median round is the result.
  std::vector<double> raw_writes = {
      RawDirectWrite(dir + "/raw", bytes, pattern)};
  fs::remove(dir + "/raw");
  std::vector<double> write_gbs, write_ratios;
  std::unique_ptr<CheckpointStore> store;
  for (int r = 0; r < rounds; ++r) {
    // A fresh store each round, as the first checkpoint of a run writes;
    // the last one stays for the restores.
    store.reset();
    fs::remove_all(dir + "/store");
    auto opened = OpenCheckpointStore(dir + "/store", CheckpointStoreOptions());
    if (!opened.ok()) {
      std::fprintf(stderr, "%s\n", opened.status().ToString().c_str());
      return 1;
    }
    store = std::move(opened).value();
    const auto start = Clock::now();
    for (const auto& m : WriteShards(*store, snapshots, threads)) {
      if (!m.ok()) {
        std::fprintf(stderr, "%s\n", m.status().ToString().c_str());
        return 1;
      }
    }
    write_gbs.push_back(bytes / Seconds(start) / 1e9);
    raw_writes.push_back(RawDirectWrite(dir + "/raw", bytes, pattern));
    fs::remove(dir + "/raw");
    write_ratios.push_back(write_gbs.back() * 2 /
                           (raw_writes[r] + raw_writes[r + 1]));
  }

  // Restores land in a worker's live shard tensors (ReadShardsInto): one
  // allocated destination per shard, touched before the timing, as live
  // shards are.
  std::vector<ShardSnapshot> into = snapshots;
  for (auto& shard : into) {
    for (auto& t : shard.tensors) {
      t.tensor = Tensor::Zeros(DType::kF32, pattern.shape()).value();
    }
  }
  // The read baseline: the store's files read raw between the store's
  // reads of them, every read after an eviction, so that all of them find
  // the disk (and the host's cache behind it) alike.
  Evict(dir + "/store");
  std::vector<double> raw_reads = {RawReadFiles(dir + "/store")};
  std::vector<double> read_gbs, read_ratios;
  ShardReadCounts counts{};
  for (int r = 0; r < rounds; ++r) {
    Evict(dir + "/store");
    const ShardReadCounts counts_before = GetShardReadCounts();
    const auto start = Clock::now();
    const std::vector<Status> read =
        ReadShardsInto(*store, snapshots.front().step, &into, threads);
    read_gbs.push_back(bytes / Seconds(start) / 1e9);
    const ShardReadCounts after = GetShardReadCounts();
    counts.direct += after.direct - counts_before.direct;
    counts.through_rocksdb +=
        after.through_rocksdb - counts_before.through_rocksdb;
    Evict(dir + "/store");
    raw_reads.push_back(RawReadFiles(dir + "/store"));
    read_ratios.push_back(read_gbs.back() * 2 /
                          (raw_reads[r] + raw_reads[r + 1]));
    for (size_t i = 0; i < into.size(); ++i) {
      for (auto& t : into[i].tensors) {
        if (!read[i].ok() || std::memcmp(t.tensor.data(), pattern.data(),
                                         pattern.num_bytes()) != 0) {
          std::fprintf(
              stderr, "read back failed: %s\n",
              read[i].ok() ? "bytes differ" : read[i].ToString().c_str());
          return 1;
        }
        std::memset(t.tensor.data(), 0, t.tensor.num_bytes());
      }
    }
  }
  store.reset();
  fs::remove_all(dir);

  std::printf(
      "checkpoint: %.2f GiB in %d shards of %d x 64 MiB, in %s, %d shards "
      "at a time, %d rounds\n",
      bytes / double(size_t{1} << 30), shards, kTensorsPerShard, base.c_str(),
      threads, rounds);
  PrintRounds("write", write_gbs, raw_writes, write_ratios);
  PrintRounds("read", read_gbs, raw_reads, read_ratios);
  std::printf(
      "  restore path: %llu shards read directly, %llu through "
      "RocksDB's iterator\n",
      static_cast<unsigned long long>(counts.direct),
      static_cast<unsigned long long>(counts.through_rocksdb));
  return 0;
}

}  // namespace
}  // namespace switchyard::storage

int main(int argc, char** argv) { return switchyard::storage::Run(argc, argv); }
