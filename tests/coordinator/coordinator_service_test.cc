// The coordinator service over a store the test hands in (the seam of
// STYLE.md 8): what Start persists before it serves, that a store which
// refuses writes keeps it from serving at all, and that a change the store
// refuses later is never acknowledged.
#include "coordinator/coordinator_service.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio.hpp>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "common/config.h"
#include "common/mutex.h"
#include "common/thread_annotations.h"
#include "transport/control/client.h"

namespace switchyard::coordinator {
namespace {

constexpr char kSnapshotKey[] = "coordinator/snapshot";

// A KvStore in memory that refuses every Write while fail_writes is set.
class MemoryKvStore : public storage::KvStore {
 public:
  std::atomic<bool> fail_writes{false};

  Status Write(const std::vector<storage::WriteBatchOp>& ops,
               bool /*sync*/) override EXCLUDES(mu_) {
    if (fail_writes) return UnavailableError("injected: the write is lost");
    MutexLock lock(&mu_);
    for (const auto& op : ops) {
      switch (op.kind) {
        case storage::WriteBatchOp::Kind::kPut:
          values_[op.key] = op.value;
          break;
        case storage::WriteBatchOp::Kind::kDelete:
          values_.erase(op.key);
          break;
        case storage::WriteBatchOp::Kind::kDeleteRange:
          values_.erase(values_.lower_bound(op.key),
                        values_.lower_bound(op.value));
          break;
      }
    }
    return OkStatus();
  }
  StatusOr<std::optional<std::string>> Get(const std::string& key) override
      EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    auto it = values_.find(key);
    if (it == values_.end()) return std::optional<std::string>();
    return std::optional<std::string>(it->second);
  }
  Status ScanPrefix(
      const std::string& prefix,
      const std::function<void(const std::string&, const std::string&)>& fn)
      override EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    for (auto it = values_.lower_bound(prefix);
         it != values_.end() &&
         it->first.compare(0, prefix.size(), prefix) == 0;
         ++it) {
      fn(it->first, it->second);
    }
    return OkStatus();
  }

 private:
  Mutex mu_;
  std::map<std::string, std::string> values_ GUARDED_BY(mu_);
};

class CoordinatorServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/switchyard_coord_" +
           std::to_string(::getpid()) + "_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    auto loaded = ParseConfig(
        "", "test",
        {"cluster.state_dir=" + dir_, "cluster.coordinator_address=127.0.0.1:0",
         "cluster.workers=2", "model.num_experts=4", "model.dense_shards=1"});
    ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
    config_ = loaded->config;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // The snapshot `store` holds (epoch 0 when it holds none).
  static control::CoordinatorSnapshot Stored(MemoryKvStore* store) {
    control::CoordinatorSnapshot snapshot;
    auto bytes = store->Get(kSnapshotKey);
    EXPECT_TRUE(bytes.ok()) << bytes.status().ToString();
    if (bytes.ok() && bytes->has_value()) {
      EXPECT_TRUE(snapshot.ParseFromString(**bytes));
    }
    return snapshot;
  }
  std::string AddrFile() const { return dir_ + "/coordinator.addr"; }

  std::string dir_;
  config::SwitchyardConfig config_;
  boost::asio::io_context io_;
};

TEST_F(CoordinatorServiceTest, ANewRunIsPersistedBeforeItServes) {
  auto owned = std::make_unique<MemoryKvStore>();
  MemoryKvStore* store = owned.get();
  CoordinatorService service(io_, config_, "secret", std::move(owned));
  ASSERT_TRUE(service.Start().ok());
  EXPECT_NE(service.port(), 0);
  EXPECT_TRUE(std::filesystem::exists(AddrFile()));
  const control::CoordinatorSnapshot snapshot = Stored(store);
  EXPECT_EQ(snapshot.epoch(), 1u);
  EXPECT_EQ(snapshot.config().model().num_experts(), 4);
  service.Shutdown();
}

TEST_F(CoordinatorServiceTest, AStoredRunResumesAtItsEpoch) {
  auto owned = std::make_unique<MemoryKvStore>();
  MemoryKvStore* store = owned.get();
  control::CoordinatorSnapshot before = ClusterState(config_).Snapshot();
  before.set_epoch(41);
  ASSERT_TRUE(
      store->Put(kSnapshotKey, before.SerializeAsString(), /*sync=*/true).ok());
  CoordinatorService service(io_, config_, "secret", std::move(owned));
  ASSERT_TRUE(service.Start().ok());
  EXPECT_EQ(Stored(store).epoch(), 41u);
  service.Shutdown();
}

TEST_F(CoordinatorServiceTest, AStoreThatLosesWritesKeepsItFromServing) {
  auto owned = std::make_unique<MemoryKvStore>();
  MemoryKvStore* store = owned.get();
  store->fail_writes = true;
  CoordinatorService service(io_, config_, "secret", std::move(owned));
  Status started = service.Start();
  EXPECT_EQ(started.code(), StatusCode::kUnavailable) << started.ToString();
  EXPECT_NE(started.message().find("injected"), std::string::npos)
      << started.ToString();
  // Nothing listens, and no address is published.
  EXPECT_EQ(service.port(), 0);
  EXPECT_FALSE(std::filesystem::exists(AddrFile()));
  service.Shutdown();
}

TEST_F(CoordinatorServiceTest, AStoredSnapshotThatDoesNotParseIsRefused) {
  auto owned = std::make_unique<MemoryKvStore>();
  ASSERT_TRUE(owned->Put(kSnapshotKey, "\xff\xff not a snapshot", true).ok());
  CoordinatorService service(io_, config_, "secret", std::move(owned));
  Status started = service.Start();
  EXPECT_EQ(started.code(), StatusCode::kDataLoss) << started.ToString();
  EXPECT_EQ(service.port(), 0);
  service.Shutdown();
}

// No coordinator state, but workers' stores in the run's checkpoint
// directory hold checkpoints: the state was deleted, and a new run over
// them is refused unless --fresh (before: "new run", training from step 0
// over the old run's directory).
TEST_F(CoordinatorServiceTest, ANewRunOverAnOldRunsCheckpointsNeedsFresh) {
  std::filesystem::create_directories(dir_ + "/checkpoints/worker-0/db");
  std::filesystem::create_directories(dir_ + "/checkpoints/worker-1/db");
  std::ofstream(dir_ + "/checkpoints/worker-1/db/000012.sst") << "x";
  {
    CoordinatorService service(io_, config_, "secret",
                               std::make_unique<MemoryKvStore>());
    const Status refused = service.Start();
    EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition)
        << refused.ToString();
    EXPECT_NE(refused.message().find("the checkpoint stores of worker-1"),
              std::string::npos)
        << refused.ToString();
    EXPECT_NE(refused.message().find("--fresh"), std::string::npos)
        << refused.ToString();
    EXPECT_EQ(service.port(), 0);
    service.Shutdown();
  }
  CoordinatorService fresh(io_, config_, "secret",
                           std::make_unique<MemoryKvStore>());
  fresh.SetResume(/*fresh=*/true, 0);
  EXPECT_TRUE(fresh.Start().ok());
  fresh.Shutdown();
}

// A registration whose state change the store refuses is answered
// UNAVAILABLE, not acknowledged; once the store takes writes again the
// retried registration is.
TEST_F(CoordinatorServiceTest, AChangeTheStoreRefusesIsNotAcknowledged) {
  auto owned = std::make_unique<MemoryKvStore>();
  MemoryKvStore* store = owned.get();
  CoordinatorService service(io_, config_, "0123456789abcdef-secret",
                             std::move(owned));
  ASSERT_TRUE(service.Start().ok());
  auto work = boost::asio::make_work_guard(io_);
  std::thread io_thread([this] { io_.run(); });
  control::ClientOptions options;
  options.server = {"127.0.0.1", service.port()};
  options.control.secret = "0123456789abcdef-secret";
  auto client = control::ControlClient::Create(io_, options, nullptr, nullptr);
  client->Start();
  ASSERT_TRUE(client->WaitConnected(std::chrono::seconds(5)).ok());
  control::Envelope request;
  auto* reg = request.mutable_register_request();
  reg->set_kind(control::WORKER);
  reg->set_name("worker-0");
  reg->set_data_address("127.0.0.1:1");
  reg->set_capacity_bytes(1 << 30);
  reg->set_device("cpu");
  reg->set_rank(-1);
  store->fail_writes = true;
  auto refused = client->CallSync(request, std::chrono::seconds(5));
  EXPECT_EQ(refused.status().code(), StatusCode::kUnavailable)
      << refused.status().ToString();
  EXPECT_NE(refused.status().message().find("cannot make its state durable"),
            std::string::npos)
      << refused.status().ToString();
  EXPECT_EQ(Stored(store).members_size(), 0);
  store->fail_writes = false;
  auto accepted = client->CallSync(request, std::chrono::seconds(5));
  EXPECT_TRUE(accepted.ok()) << accepted.status().ToString();
  EXPECT_EQ(Stored(store).members_size(), 1);
  client->Shutdown();
  service.Shutdown();
  work.reset();
  io_.stop();
  io_thread.join();
}

}  // namespace
}  // namespace switchyard::coordinator
