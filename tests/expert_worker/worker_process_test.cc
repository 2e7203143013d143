#include "expert_worker/worker_process.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/tensor.h"
#include "storage/checkpoint_store.h"

namespace switchyard::expert_worker {
namespace {

namespace fs = std::filesystem;

// A store whose files RocksDB finds damaged at open (a table's footer) is
// moved aside as it is and replaced by an empty one, so the worker keeps
// running and fetches its shards from their other holders; other open
// errors are returned as they are.
TEST(WorkerProcessTest, ADamagedStoreIsMovedAsideAndReplaced) {
  const std::string base =
      ::testing::TempDir() + "/switchyard_wp_" + std::to_string(::getpid());
  fs::remove_all(base);
  fs::create_directories(base);
  const std::string dir = base + "/worker-0";
  {
    auto store = storage::OpenCheckpointStore(dir, {});
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    storage::ShardSnapshot snapshot;
    snapshot.shard = "L0.E1.S0";
    snapshot.step = 5;
    snapshot.tensors.push_back(
        {"w1", Tensor::Zeros(DType::kF32, {64, 64}).value()});
    ASSERT_TRUE((*store)->WriteShard(snapshot).ok());
  }
  // The last byte of every table file: its footer's magic number.
  uintmax_t damaged_bytes = 0;
  for (const auto& e : fs::directory_iterator(dir + "/db")) {
    if (e.path().extension() != ".sst") continue;
    std::fstream f(e.path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-1, std::ios::end);
    char c = 0;
    f.read(&c, 1);
    c ^= 0x5a;
    f.seekp(-1, std::ios::end);
    f.write(&c, 1);
    damaged_bytes += fs::file_size(e.path());
  }
  ASSERT_GT(damaged_bytes, 0u);
  ASSERT_EQ(storage::OpenCheckpointStore(dir, {}).status().code(),
            StatusCode::kDataLoss);

  auto store = OpenWorkerStore(dir);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  auto manifests = (*store)->Manifests(std::nullopt);
  ASSERT_TRUE(manifests.ok());
  EXPECT_TRUE(manifests->empty());
  EXPECT_EQ((*store)->ReadShard(5, "L0.E1.S0").status().code(),
            StatusCode::kNotFound);
  // The damaged store, kept whole for inspection or repair.
  std::vector<fs::path> aside;
  for (const auto& e : fs::directory_iterator(base)) {
    if (e.path().filename().string().rfind("worker-0.damaged-", 0) == 0) {
      aside.push_back(e.path());
    }
  }
  ASSERT_EQ(aside.size(), 1u);
  uintmax_t kept_bytes = 0;
  for (const auto& e : fs::directory_iterator(aside[0] / "db")) {
    if (e.path().extension() == ".sst") kept_bytes += fs::file_size(e.path());
  }
  EXPECT_EQ(kept_bytes, damaged_bytes);

  // Not damage (a file where the store's directory should be): the error,
  // nothing moved.
  const std::string blocked = base + "/worker-1";
  std::ofstream(blocked) << "not a directory";
  auto refused = OpenWorkerStore(blocked);
  EXPECT_FALSE(refused.ok());
  EXPECT_NE(refused.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(fs::is_regular_file(blocked));
  fs::remove_all(base);
}

}  // namespace
}  // namespace switchyard::expert_worker
