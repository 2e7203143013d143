// Power loss under the real RocksDB engine (tests/testing/power_loss_fs.h):
// a workload runs on a file system that cuts the power before its n-th file
// operation, for every n; what the power loss leaves is reopened through
// the default file system and checked against what the workload was told
// was durable. The checkpoint store: a shard WriteShard returned survives
// whole, one cut mid-write is whole or absent. The coordinator: what a
// reply acknowledged (members, epoch, committed checkpoints) survives.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio.hpp>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "common/config.h"
#include "common/model_shape.h"
#include "common/shard_ref.h"
#include "coordinator/cluster_state.h"
#include "coordinator/coordinator_service.h"
#include "storage/checkpoint_store.h"
#include "storage/direct_write_fs.h"
#include "storage/kv_store.h"
#include "tests/testing/power_loss_fs.h"
#include "transport/control/client.h"

namespace switchyard {
namespace {

namespace fs = std::filesystem;
using storage::CheckpointStore;
using storage::ShardSnapshot;
using switchyard::testing::PowerLossFileSystem;

class PowerLossTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(
               ::testing::TempDir() + "/switchyard_power_" +
               std::to_string(::getpid()) + "_" +
               ::testing::UnitTest::GetInstance()->current_test_info()->name())
               .lexically_normal()
               .string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // An empty directory for one run.
  std::string Fresh(const std::string& name) {
    const std::string d = dir_ + "/" + name;
    fs::remove_all(d);
    fs::create_directories(d);
    return d;
  }

  std::string dir_;
};

// --- The tool itself, on plain files.

// Writes `bytes` to a new file through `fs`, syncing it when `sync`.
void WriteFile(rocksdb::FileSystem& fs, const std::string& path,
               const std::string& bytes, bool sync) {
  std::unique_ptr<rocksdb::FSWritableFile> f;
  ASSERT_TRUE(fs.NewWritableFile(path, {}, &f, nullptr).ok());
  ASSERT_TRUE(f->Append(bytes, {}, nullptr).ok());
  if (sync) {
    ASSERT_TRUE(f->Sync({}, nullptr).ok());
  }
  ASSERT_TRUE(f->Close({}, nullptr).ok());
}
void SyncDir(rocksdb::FileSystem& fs, const std::string& dir) {
  std::unique_ptr<rocksdb::FSDirectory> d;
  ASSERT_TRUE(fs.NewDirectory(dir, {}, &d, nullptr).ok());
  ASSERT_TRUE(d->Fsync({}, nullptr).ok());
}
std::string Contents(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST_F(PowerLossTest, TheFileSystemDropsWhatWasNotSynced) {
  PowerLossFileSystem plfs(rocksdb::FileSystem::Default());
  const std::string d = dir_ + "/d";
  ASSERT_TRUE(plfs.CreateDir(d, {}, nullptr).ok());
  SyncDir(plfs, dir_);
  WriteFile(plfs, d + "/synced", "durable", /*sync=*/true);
  WriteFile(plfs, d + "/unsynced", "lost", /*sync=*/false);
  SyncDir(plfs, d);
  {  // Appended after the last sync: cut off.
    std::unique_ptr<rocksdb::FSWritableFile> f;
    ASSERT_TRUE(plfs.ReopenWritableFile(d + "/synced", {}, &f, nullptr).ok());
    ASSERT_TRUE(f->Append("+tail", {}, nullptr).ok());
    ASSERT_TRUE(f->Close({}, nullptr).ok());
  }
  WriteFile(plfs, d + "/new", "synced, its name not", /*sync=*/true);
  WriteFile(plfs, d + "/tmp", "replacement", /*sync=*/true);
  ASSERT_TRUE(plfs.RenameFile(d + "/tmp", d + "/unsynced", {}, nullptr).ok());
  ASSERT_TRUE(plfs.CreateDir(d + "/sub", {}, nullptr).ok());
  WriteFile(plfs, d + "/sub/f", "x", /*sync=*/true);
  SyncDir(plfs, d + "/sub");
  EXPECT_EQ(plfs.operations(), 22u);
  plfs.CutPowerNow();
  EXPECT_FALSE(plfs.DeleteFile(d + "/synced", {}, nullptr).ok());
  EXPECT_EQ(plfs.first_refused(), "delete " + d + "/synced");

  ASSERT_TRUE(plfs.DropUnsyncedData().ok());
  EXPECT_EQ(Contents(d + "/synced"), "durable");
  EXPECT_EQ(Contents(d + "/unsynced"), "");  // Its bytes never synced.
  EXPECT_FALSE(fs::exists(d + "/new"));
  EXPECT_FALSE(fs::exists(d + "/tmp"));  // Renamed back, then not created.
  EXPECT_FALSE(fs::exists(d + "/sub"));  // Its parent was not synced.
  EXPECT_EQ(plfs.operations(), 0u);
  EXPECT_FALSE(plfs.power_cut());
}

TEST_F(PowerLossTest, AnUnsyncedRocksDbWriteIsLostAndASyncedOneIsNot) {
  // The harness can fail: RocksDB's sync option is what keeps a write.
  for (bool sync : {false, true}) {
    const std::string db = Fresh(sync ? "synced" : "unsynced") + "/db";
    auto plfs =
        std::make_shared<PowerLossFileSystem>(rocksdb::FileSystem::Default());
    {
      auto kv = storage::OpenRocksKvStore(db, plfs);
      ASSERT_TRUE(kv.ok()) << kv.status().ToString();
      ASSERT_TRUE((*kv)->Put("k", "v", sync).ok());
      plfs->CutPowerNow();
    }
    ASSERT_TRUE(plfs->DropUnsyncedData().ok());
    auto kv = storage::OpenRocksKvStore(db);
    ASSERT_TRUE(kv.ok()) << kv.status().ToString();
    auto v = (*kv)->Get("k");
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(v->has_value(), sync);
  }
}

// --- The checkpoint store.

// Which cut a failure is about: "power cut before operation 7 (sync ...)".
std::string Where(uint64_t cut, const PowerLossFileSystem& fs) {
  return "power cut before operation " + std::to_string(cut) + " (" +
         fs.first_refused() + ")";
}

ShardSnapshot Snapshot(const std::string& shard, int64_t step, int version) {
  ShardSnapshot s;
  s.shard = shard;
  s.step = step;
  s.epoch = 2 + version;
  std::mt19937 rng(static_cast<uint32_t>(step * 977 + version * 31) +
                   static_cast<uint32_t>(std::hash<std::string>()(shard)));
  auto filled = [&](DType dtype, std::vector<int64_t> shape) {
    Tensor t = Tensor::Zeros(dtype, std::move(shape)).value();
    auto* bytes = static_cast<uint8_t*>(t.data());
    for (size_t i = 0; i < t.num_bytes(); ++i) bytes[i] = rng() & 0xff;
    return t;
  };
  s.tensors.push_back({"w1", filled(DType::kF32, {24, 20})});
  s.tensors.push_back({"w2", filled(DType::kBF16, {20, 24})});
  s.tensors.push_back({"opt.w1.m", filled(DType::kF32, {24, 20})});
  return s;
}

// Opens the store in `dir` through `file_system` (null: the default).
StatusOr<std::unique_ptr<CheckpointStore>> Open(
    const std::string& dir,
    std::shared_ptr<PowerLossFileSystem> file_system = nullptr) {
  storage::CheckpointStoreOptions options;
  options.chunk_bytes = 1000;  // Every tensor spans chunks.
  options.file_system = std::move(file_system);
  return storage::OpenCheckpointStore(dir, options);
}

// A shard checkpoint WriteShard returned: the worker reports it now.
struct Reported {
  std::string shard;
  int64_t step = 0;
  std::string digest;
};

// Every listed checkpoint reads back whole, the files verify, and every
// reported one is there with its digest (`gone_steps` excepted: a drop of
// them had begun). Returns the manifests.
std::vector<checkpoint::ShardManifest> ExpectIntact(
    CheckpointStore& store, const std::vector<Reported>& reported,
    const std::set<int64_t>& gone_steps, const std::string& where) {
  auto manifests = store.Manifests(std::nullopt);
  EXPECT_TRUE(manifests.ok()) << where << ": " << manifests.status().ToString();
  if (!manifests.ok()) return {};
  for (const auto& m : *manifests) {
    auto back = store.ReadShard(m.step(), m.shard());
    EXPECT_TRUE(back.ok()) << where << ": listed " << m.shard() << " at "
                           << m.step() << ": " << back.status().ToString();
  }
  for (const Reported& r : reported) {
    if (gone_steps.count(r.step) != 0) continue;
    auto back = store.ReadShard(r.step, r.shard);
    EXPECT_TRUE(back.ok()) << where << ": reported " << r.shard << " at "
                           << r.step << ": " << back.status().ToString();
    if (back.ok()) {
      EXPECT_EQ(storage::SnapshotDigest(*back), r.digest)
          << where << ": " << r.shard << " at " << r.step;
    }
  }
  const Status verified = store.VerifyFiles();
  EXPECT_TRUE(verified.ok()) << where << ": " << verified.ToString();
  return std::move(manifests).value();
}

// A worker's checkpoints: two shards at steps 1-3, then step 1 dropped.
// It stops at the first failure (the power went; so did the process).
struct CheckpointRun {
  std::vector<Reported> reported;
  std::set<int64_t> gone_steps;       // Steps whose drop began.
  std::vector<uint64_t> reported_at;  // Operations done at each report.
};
CheckpointRun RunCheckpoints(const std::string& dir,
                             std::shared_ptr<PowerLossFileSystem> plfs) {
  CheckpointRun run;
  auto store = Open(dir, plfs);
  if (!store.ok()) return run;
  for (int64_t step = 1; step <= 3; ++step) {
    for (const char* shard : {"L0.E1.S0", "D0"}) {
      const ShardSnapshot s = Snapshot(shard, step, 0);
      auto m = (*store)->WriteShard(s);
      if (!m.ok()) return run;
      EXPECT_EQ(m->digest(), storage::SnapshotDigest(s));
      run.reported.push_back({shard, step, m->digest()});
      run.reported_at.push_back(plfs->operations());
    }
  }
  run.gone_steps.insert(1);
  (void)(*store)->DropSteps(1, 2);
  return run;
}

TEST_F(PowerLossTest, AReportedCheckpointSurvivesPowerLossAtEveryLaterPoint) {
  // The whole run once, uncut, to count its operations.
  auto plfs =
      std::make_shared<PowerLossFileSystem>(storage::DirectWriteFileSystem());
  const CheckpointRun full = RunCheckpoints(Fresh("full") + "/store", plfs);
  ASSERT_EQ(full.reported.size(), 6u);
  const uint64_t total = plfs->operations();
  ASSERT_GT(total, full.reported_at.back());
  // Then cut before every operation (from the store's creation on), and
  // after the last (the whole run done, its unsynced bytes lost).
  for (uint64_t cut = 0; cut <= total; ++cut) {
    const std::string dir = Fresh("cut") + "/store";
    plfs =
        std::make_shared<PowerLossFileSystem>(storage::DirectWriteFileSystem());
    plfs->CutPowerAt(cut);
    const CheckpointRun run = RunCheckpoints(dir, plfs);
    const std::string where = Where(cut, *plfs);
    ASSERT_TRUE(plfs->DropUnsyncedData().ok());
    auto store = Open(dir);
    ASSERT_TRUE(store.ok()) << where << ": " << store.status().ToString();
    if (cut >= full.reported_at.front()) {
      EXPECT_GE(run.reported.size(), 1u) << where;
    }
    ExpectIntact(**store, run.reported, run.gone_steps, where);
    if (HasFailure()) break;  // One cut's story is enough.
  }
}

TEST_F(PowerLossTest, ACheckpointCutMidWriteIsWholeOrAbsent) {
  // Step 1 written, then a new shard checkpoint (D0 at 2) and a rewrite of
  // one (L0.E1.S0 at 1, other bytes); the power is cut before every
  // operation of those two writes.
  const ShardSnapshot a1 = Snapshot("L0.E1.S0", 1, 0);
  const ShardSnapshot a1_new = Snapshot("L0.E1.S0", 1, 1);
  const ShardSnapshot d1 = Snapshot("D0", 1, 0);
  const ShardSnapshot d2 = Snapshot("D0", 2, 0);
  struct Written {
    uint64_t before = 0, after = 0;   // Operations done around the writes.
    bool d2 = false, a1_new = false;  // Which of them returned OK.
  };
  auto run = [&](const std::string& dir,
                 const std::shared_ptr<PowerLossFileSystem>& plfs,
                 std::optional<uint64_t> cut_after_setup) {
    Written w;
    auto store = Open(dir, plfs);
    EXPECT_TRUE(store.ok()) << store.status().ToString();
    if (!store.ok()) return w;
    EXPECT_TRUE((*store)->WriteShard(a1).ok());
    EXPECT_TRUE((*store)->WriteShard(d1).ok());
    w.before = plfs->operations();
    if (cut_after_setup) plfs->CutPowerAt(w.before + *cut_after_setup);
    w.d2 = (*store)->WriteShard(d2).ok();
    w.a1_new = w.d2 && (*store)->WriteShard(a1_new).ok();
    w.after = plfs->operations();
    return w;
  };
  auto plfs =
      std::make_shared<PowerLossFileSystem>(storage::DirectWriteFileSystem());
  const Written full = run(Fresh("full") + "/store", plfs, std::nullopt);
  ASSERT_TRUE(full.d2 && full.a1_new);
  ASSERT_GT(full.after - full.before, 10u);
  int d2_absent = 0, d2_whole = 0, a1_old = 0, a1_rewritten = 0;
  for (uint64_t k = 0; k <= full.after - full.before; ++k) {
    const std::string dir = Fresh("cut") + "/store";
    plfs =
        std::make_shared<PowerLossFileSystem>(storage::DirectWriteFileSystem());
    const Written w = run(dir, plfs, k);
    const std::string where = Where(w.before + k, *plfs);
    ASSERT_TRUE(plfs->DropUnsyncedData().ok());
    auto store = Open(dir);
    ASSERT_TRUE(store.ok()) << where << ": " << store.status().ToString();
    // Step 1's D0 was reported; the L0.E1.S0 rewrite is checked below.
    const auto manifests = ExpectIntact(
        **store, {{"D0", 1, storage::SnapshotDigest(d1)}}, {}, where);
    // D0 at 2: absent (not listed, NOT_FOUND) or whole; whole if reported.
    auto back = (*store)->ReadShard(2, "D0");
    const bool listed = std::any_of(
        manifests.begin(), manifests.end(),
        [](const auto& m) { return m.step() == 2 && m.shard() == "D0"; });
    if (back.ok()) {
      ++d2_whole;
      EXPECT_TRUE(listed) << where;
      EXPECT_EQ(storage::SnapshotDigest(*back), storage::SnapshotDigest(d2))
          << where;
    } else {
      ++d2_absent;
      EXPECT_EQ(back.status().code(), StatusCode::kNotFound)
          << where << ": " << back.status().ToString();
      EXPECT_FALSE(listed) << where;
      EXPECT_FALSE(w.d2) << where << ": reported, then lost";
    }
    // L0.E1.S0 at 1: the old bytes or the new, the new if reported.
    auto a = (*store)->ReadShard(1, "L0.E1.S0");
    ASSERT_TRUE(a.ok()) << where << ": " << a.status().ToString();
    const std::string digest = storage::SnapshotDigest(*a);
    if (digest == storage::SnapshotDigest(a1_new)) {
      ++a1_rewritten;
    } else {
      ++a1_old;
      EXPECT_EQ(digest, storage::SnapshotDigest(a1)) << where;
      EXPECT_FALSE(w.a1_new) << where << ": rewrite reported, then lost";
    }
    if (HasFailure()) break;
  }
  // The cuts fell on both sides of each commit.
  EXPECT_GT(d2_absent, 0);
  EXPECT_GT(d2_whole, 0);
  EXPECT_GT(a1_old, 0);
  EXPECT_GT(a1_rewritten, 0);
}

// --- The coordinator.

constexpr char kSecret[] = "power-loss-test-secret-0123456789abcdef";

// What the coordinator's replies acknowledged.
struct Acked {
  bool started = false;  // Start returned OK: the run is persisted.
  uint64_t epoch = 0;    // The newest epoch a reply carried.
  std::map<std::string, uint64_t> incarnations;  // Registered members.
  std::set<std::string> left;
  std::set<int64_t> committed;  // Steps a report ack said it committed.
  int64_t committed_step = 0;   // The newest a heartbeat ack named.
};

class CoordinatorPowerLossTest : public PowerLossTest {
 protected:
  void SetUp() override {
    PowerLossTest::SetUp();
    auto loaded = ParseConfig(
        "", "test",
        {"cluster.state_dir=" + dir_, "cluster.coordinator_address=127.0.0.1:0",
         "cluster.workers=2", "cluster.lease_ms=60000",
         "cluster.heartbeat_ms=1000", "model.num_experts=4",
         "model.dense_shards=1", "checkpoint.keep_last=5"});
    ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
    config_ = loaded->config;
  }

  // Starts a coordinator on a store in `dir` through `plfs` and drives it
  // as two workers would: register, heartbeat, report two checkpoints,
  // leave. Every request is sent whatever became of the earlier ones.
  Acked Run(const std::string& dir,
            const std::shared_ptr<PowerLossFileSystem>& plfs) {
    Acked acked;
    auto store = storage::OpenRocksKvStore(dir, plfs);
    if (!store.ok()) return acked;
    boost::asio::io_context io;
    auto work = boost::asio::make_work_guard(io);
    std::thread thread([&io] { io.run(); });
    auto service = std::make_unique<coordinator::CoordinatorService>(
        io, config_, kSecret, std::move(store).value());
    if (service->Start().ok()) {
      acked.started = true;
      Drive(io, service->port(), &acked);
    }
    service->Shutdown();
    work.reset();
    io.stop();
    thread.join();
    service.reset();
    return acked;
  }

  void Drive(boost::asio::io_context& io, uint16_t port, Acked* acked) {
    control::ClientOptions options;
    options.server = {"127.0.0.1", port};
    options.control.secret = kSecret;
    options.min_backoff = std::chrono::milliseconds(10);
    auto client = control::ControlClient::Create(io, options, nullptr, nullptr);
    client->Start();
    ASSERT_TRUE(client->WaitConnected(std::chrono::seconds(10)).ok());
    auto call = [&](control::Envelope request) {
      return client->CallSync(std::move(request), std::chrono::seconds(10));
    };
    const char* const workers[2] = {"worker-0", "worker-1"};
    for (const char* name : workers) {
      control::Envelope e;
      auto* r = e.mutable_register_request();
      r->set_kind(control::WORKER);
      r->set_name(name);
      r->set_capacity_bytes(int64_t{1} << 30);
      r->set_device("cpu");
      r->set_rank(-1);
      auto reply = call(e);
      if (!reply.ok()) continue;
      acked->incarnations[name] = reply->register_response().incarnation();
      acked->epoch =
          std::max(acked->epoch, reply->register_response().routing().epoch());
    }
    // The incarnation a registration reply gave `name` (0: none).
    auto incarnation = [&](const std::string& name) {
      auto it = acked->incarnations.find(name);
      return it == acked->incarnations.end() ? uint64_t{0} : it->second;
    };
    auto heartbeat = [&](const char* name) {
      control::Envelope e;
      e.mutable_heartbeat()->set_name(name);
      e.mutable_heartbeat()->set_incarnation(incarnation(name));
      auto reply = call(e);
      if (!reply.ok()) return;
      acked->epoch = std::max(acked->epoch, reply->heartbeat_ack().epoch());
      acked->committed_step = std::max(acked->committed_step,
                                       reply->heartbeat_ack().committed_step());
    };
    const auto shards = ModelShards(config_);
    for (int64_t step : {10, 20}) {
      for (int w = 0; w < 2; ++w) {
        heartbeat(workers[w]);
        // Worker w holds every other shard.
        control::Envelope e;
        auto* report = e.mutable_checkpoint_report();
        report->set_name(workers[w]);
        report->set_incarnation(incarnation(workers[w]));
        report->set_step(step);
        for (size_t i = w; i < shards.size(); i += 2) {
          auto* s = report->add_shards();
          *s->mutable_shard() = ToShardRef(shards[i].id);
          s->set_digest("digest-" + std::to_string(step * 100 + i));
          s->set_bytes(1000);
        }
        auto reply = call(e);
        if (!reply.ok()) continue;
        const int64_t c = reply->checkpoint_report_ack().committed_step();
        if (c != 0) acked->committed.insert(c);
      }
    }
    heartbeat("worker-0");
    control::Envelope leave;
    leave.mutable_leave()->set_name("worker-1");
    leave.mutable_leave()->set_incarnation(incarnation("worker-1"));
    if (call(leave).ok()) acked->left.insert("worker-1");
    heartbeat("worker-0");
    client->Shutdown();
  }

  // What the store in `dir` holds after the power loss covers `acked`.
  void ExpectDurable(const std::string& dir, const Acked& acked,
                     const std::string& where) {
    auto store = storage::OpenRocksKvStore(dir);
    ASSERT_TRUE(store.ok()) << where << ": " << store.status().ToString();
    auto bytes = (*store)->Get("coordinator/snapshot");
    ASSERT_TRUE(bytes.ok()) << where << ": " << bytes.status().ToString();
    if (!bytes->has_value()) {
      EXPECT_FALSE(acked.started) << where << ": a started run is lost";
      return;
    }
    control::CoordinatorSnapshot snapshot;
    ASSERT_TRUE(snapshot.ParseFromString(**bytes)) << where;
    EXPECT_GE(snapshot.epoch(), acked.epoch) << where;
    std::map<std::string, const control::MemberRecord*> members;
    for (const auto& m : snapshot.members()) {
      members[m.registration().name()] = &m;
    }
    for (const auto& [name, incarnation] : acked.incarnations) {
      ASSERT_TRUE(members.count(name)) << where << ": " << name << " lost";
      EXPECT_EQ(members[name]->incarnation(), incarnation) << where;
    }
    for (const auto& name : acked.left) {
      EXPECT_EQ(members[name]->state(), control::LEFT) << where << ": " << name;
    }
    std::set<int64_t> committed;
    for (const auto& c : snapshot.committed()) committed.insert(c.step());
    for (int64_t step : acked.committed) {
      EXPECT_TRUE(committed.count(step)) << where << ": commit " << step;
    }
    EXPECT_GE(committed.empty() ? 0 : *committed.rbegin(), acked.committed_step)
        << where;
    // And a restarted coordinator resumes from it.
    auto restored = coordinator::ClusterState::Restore(
        config_, snapshot, coordinator::Clock::now());
    EXPECT_TRUE(restored.ok()) << where << ": " << restored.status().ToString();
  }

  config::SwitchyardConfig config_;
};

TEST_F(CoordinatorPowerLossTest, WhatARepliedAcknowledgedSurvivesPowerLoss) {
  auto plfs =
      std::make_shared<PowerLossFileSystem>(rocksdb::FileSystem::Default());
  const Acked full = Run(Fresh("full") + "/coordinator", plfs);
  ASSERT_TRUE(full.started);
  ASSERT_EQ(full.incarnations.size(), 2u);
  ASSERT_EQ(full.committed, (std::set<int64_t>{10, 20}));
  ASSERT_EQ(full.left.size(), 1u);
  const uint64_t total = plfs->operations();
  int between_commits = 0;  // Cuts after step 10's commit, before 20's.
  for (uint64_t cut = 0; cut <= total; ++cut) {
    const std::string dir = Fresh("cut") + "/coordinator";
    plfs =
        std::make_shared<PowerLossFileSystem>(rocksdb::FileSystem::Default());
    plfs->CutPowerAt(cut);
    const Acked acked = Run(dir, plfs);
    const std::string where = Where(cut, *plfs);
    ASSERT_TRUE(plfs->DropUnsyncedData().ok());
    ExpectDurable(dir, acked, where);
    if (HasFailure()) break;
    between_commits += acked.committed.size() == 1;
  }
  EXPECT_GT(between_commits, 0);
}

}  // namespace
}  // namespace switchyard
