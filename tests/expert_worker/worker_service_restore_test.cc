// A worker's checkpoints across failures and restarts: a full disk fails
// one checkpoint while training goes on, peers fetch the checkpoints only at
// the current epoch, a fresh worker restores the last one (and refuses a
// damaged one, naming it), and a routing table offered
// during a slow restore keeps heartbeats and requests answered.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/metrics.h"
#include "common/shard_ref.h"
#include "expert_worker/worker_service.h"
#include "storage/checkpoint_store.h"
#include "tests/expert_worker/worker_test_util.h"
#include "tests/testing/files.h"

namespace switchyard::expert_worker::worker_testing {
namespace {

// Checkpoints at every step boundary: a full disk fails one (no report,
// nothing stored for it) while training goes on unchanged; the earlier and
// later ones are whole, and a fresh worker resumes from the last one with
// the same parameters and optimizer state.
TEST(WorkerServiceTest, CheckpointsSurviveAFullDiskAndRestore) {
  const std::string dir = FreshDir("ckpt");
  config::SwitchyardConfig config = TestConfig("adamw");
  config.mutable_checkpoint()->set_every(1);
  auto inner = storage::OpenCheckpointStore(dir, {});
  ASSERT_TRUE(inner.ok());
  auto owned = std::make_unique<FullDiskStore>(std::move(inner).value());
  FullDiskStore* store = owned.get();
  std::mutex mu;
  std::vector<int64_t> reported;
  uint64_t checkpoint_bytes = 0;
  std::string digest;
  const uint64_t failed_before =
      CounterValue("switchyard_worker_checkpoints_failed_total");
  {
    WorkerService worker(config, "w");
    worker.EnableCheckpoints(std::move(owned),
                             [&](const control::CheckpointReport& r) {
                               std::lock_guard<std::mutex> lock(mu);
                               reported.push_back(r.step());
                               EXPECT_EQ(r.shards_size(), 2 + 4);
                               checkpoint_bytes = 0;
                               for (const auto& shard : r.shards()) {
                                 checkpoint_bytes += shard.bytes();
                               }
                               return OkStatus();
                             });
    ASSERT_TRUE(worker.Start().ok());
    ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
    // The staging buffers are made with the shards, and every checkpoint
    // reuses them (none is allocated while a step waits).
    const size_t staging = worker.StagingCachedBytes();
    EXPECT_GT(staging, 0u);
    for (int step = 0; step < kSteps; ++step) {
      store->full = step == 1;  // Checkpoint 2 hits the full disk.
      StepTogether(&worker, step);
      worker.WaitCheckpointsWritten();
    }
    store->full = false;
    EXPECT_EQ(reported, (std::vector<int64_t>{1, 3}));
    EXPECT_EQ(CounterValue("switchyard_worker_checkpoints_failed_total"),
              failed_before + 1);
    EXPECT_EQ(MetricsRegistry::Global()
                  .GetGauge("switchyard_worker_checkpoint_last_step")
                  ->value(),
              3.0);
    EXPECT_GE(staging, checkpoint_bytes);
    EXPECT_EQ(worker.StagingCachedBytes(), staging);
    EXPECT_EQ(store->Manifests(2)->size(), 0u) << "nothing of the failed one";
    EXPECT_EQ(store->Manifests(1)->size(), 6u);
    ASSERT_EQ(store->Manifests(3)->size(), 6u);
    // Training was not disturbed.
    digest = worker.ParameterDigest();
    EXPECT_EQ(digest, RunInterleaved("adamw", 0));
    // Peers fetch checkpoints at the current epoch; an older one is refused.
    for (uint64_t epoch : {kEpoch, kEpoch - 1}) {
      Message fetch;
      fetch.header.kind = static_cast<uint8_t>(MessageKind::kCheckpointFetch);
      fetch.header.epoch = epoch;
      fetch.header.step = 3;
      fetch.header.layer = 0;  // MoE-layer ordinal: L0.E1.S0.
      fetch.header.expert = 1;
      const Message answer = Ask(&worker, std::move(fetch));
      if (epoch == kEpoch) {
        EXPECT_EQ(answer.header.status_code, 0) << answer.error_text;
        EXPECT_GT(answer.payload.num_elements(), 0);
      } else {
        EXPECT_EQ(answer.header.status_code,
                  static_cast<int32_t>(StatusCode::kFailedPrecondition));
        EXPECT_NE(answer.error_text.find("stale epoch"), std::string::npos)
            << answer.error_text;
      }
    }
    worker.Shutdown();
  }  // The worker, and its store, are gone.

  // A new worker process resumes from checkpoint 3.
  control::RoutingTable routing = Routing(kEpoch + 1);
  routing.set_resume_step(3);
  {
    WorkerService resumed(config, "w");
    auto reopened = storage::OpenCheckpointStore(dir, {});
    ASSERT_TRUE(reopened.ok());
    resumed.EnableCheckpoints(std::move(reopened).value(), nullptr);
    ASSERT_TRUE(resumed.Start().ok());
    ASSERT_TRUE(resumed.ApplyRouting(routing).ok());
    EXPECT_EQ(resumed.next_step(), 3);
    EXPECT_EQ(resumed.ParameterDigest(), digest);
    resumed.Shutdown();
  }  // Its store is closed.

  // The routing table carries the committed digests: a copy that matches
  // them restores; one that is not the committed copy (its digest differs)
  // is refused with DATA_LOSS naming the shard, with no other copy to try.
  {
    auto reopened = storage::OpenCheckpointStore(dir, {});
    ASSERT_TRUE(reopened.ok());
    std::map<std::string, std::string> digests;
    auto manifests = (*reopened)->Manifests(3);
    ASSERT_TRUE(manifests.ok()) << manifests.status().ToString();
    for (const auto& m : *manifests) digests[m.shard()] = m.digest();
    control::RoutingTable checked = routing;
    for (auto& e : *checked.mutable_entries()) {
      e.set_resume_digest(digests.at(FromShardRef(e.shard()).ToString()));
    }
    control::RoutingTable wrong = checked;
    wrong.mutable_entries(3)->set_resume_digest(std::string(32, '0'));
    const std::string wrong_shard =
        FromShardRef(wrong.entries(3).shard()).ToString();
    WorkerService resumed(config, "w");
    resumed.EnableCheckpoints(std::move(reopened).value(), nullptr);
    ASSERT_TRUE(resumed.Start().ok());
    const Status refused = resumed.ApplyRouting(wrong);
    EXPECT_EQ(refused.code(), StatusCode::kDataLoss) << refused.ToString();
    EXPECT_NE(refused.ToString().find(wrong_shard + " at step 3 has digest"),
              std::string::npos)
        << refused.ToString();
    EXPECT_NE(refused.ToString().find("the committed digest is"),
              std::string::npos)
        << refused.ToString();
    checked.set_epoch(kEpoch + 2);
    ASSERT_TRUE(resumed.ApplyRouting(checked).ok());
    EXPECT_EQ(resumed.ParameterDigest(), digest);
    resumed.Shutdown();
  }

  // A flipped byte in one chunk of one shard of checkpoint 3, and no other
  // copy anywhere (no replicas, no peers): the restore fails with an error
  // that names the shard and the step, and loads nothing.
  const std::string victim = "L0.E1.S0";
  ASSERT_TRUE(testing::FlipStoredByte(dir + "/db",
                                      "ckpt/0000000000000003/" + victim + "/",
                                      11, 0x40)
                  .ok());
  WorkerService damaged(config, "w");
  auto again = storage::OpenCheckpointStore(dir, {});
  ASSERT_TRUE(again.ok());
  damaged.EnableCheckpoints(std::move(again).value(), nullptr);
  ASSERT_TRUE(damaged.Start().ok());
  const Status refused = damaged.ApplyRouting(routing);
  EXPECT_EQ(refused.code(), StatusCode::kDataLoss) << refused.ToString();
  EXPECT_NE(refused.ToString().find(victim), std::string::npos)
      << refused.ToString();
  EXPECT_NE(refused.ToString().find("step 3"), std::string::npos)
      << refused.ToString();
  EXPECT_NE(damaged.next_step(), 3) << "nothing of checkpoint 3 was adopted";
  damaged.Shutdown();
  std::filesystem::remove_all(dir);
}

// A routing table offered by the control thread is applied on the worker's
// own thread: while its restore reads, heartbeats' load reports and the
// data plane's requests are answered at once, the new epoch's requests are
// refused as not ready, and the table is adopted whole when the reads end.
TEST(WorkerServiceTest, RestoreDoesNotHoldUpHeartbeatsOrRequests) {
  const std::string dir = FreshDir("gated");
  config::SwitchyardConfig config = TestConfig("adamw");
  config.mutable_checkpoint()->set_every(1);
  std::string digest;
  {
    WorkerService writer(config, "w");
    writer.EnableCheckpoints(storage::OpenCheckpointStore(dir, {}).value(),
                             nullptr);
    ASSERT_TRUE(writer.Start().ok());
    ASSERT_TRUE(writer.ApplyRouting(Routing(kEpoch)).ok());
    StepTogether(&writer, 0);
    writer.WaitCheckpointsWritten();
    digest = writer.ParameterDigest();
    writer.Shutdown();
  }
  auto owned = std::make_unique<GatedReadStore>(
      storage::OpenCheckpointStore(dir, {}).value());
  GatedReadStore* store = owned.get();
  WorkerService worker(config, "w");
  worker.EnableCheckpoints(std::move(owned), nullptr);
  ASSERT_TRUE(worker.Start().ok());
  control::RoutingTable routing = Routing(kEpoch + 1);
  routing.set_resume_step(1);
  const auto offered = std::chrono::steady_clock::now();
  worker.OfferRouting(routing);
  EXPECT_LT(std::chrono::steady_clock::now() - offered, Ms(100));
  const auto deadline = std::chrono::steady_clock::now() + Ms(10000);
  while (store->waiting == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(5));
  }
  ASSERT_GT(store->waiting.load(), 0) << "the restore never started";
  // Mid-restore: the heartbeat's loads and a request answer promptly.
  const auto asked = std::chrono::steady_clock::now();
  EXPECT_TRUE(worker.TakeLoads().empty()) << "no shard adopted yet";
  Message early = Ask(&worker, Request(MessageKind::kExpertForward, 1, 0, 0, 0,
                                       0, kEpoch + 1, 2));
  EXPECT_EQ(early.header.status_code, static_cast<int>(StatusCode::kAborted))
      << early.error_text;
  EXPECT_LT(std::chrono::steady_clock::now() - asked, Ms(1000));
  EXPECT_EQ(worker.next_step(), 0);
  store->open = true;
  while (worker.next_step() != 1 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(5));
  }
  ASSERT_EQ(worker.next_step(), 1);
  EXPECT_EQ(worker.ParameterDigest(), digest);
  EXPECT_EQ(worker.TakeLoads().size(), 4u);
  worker.Shutdown();
  std::filesystem::remove_all(dir);
}

// A live worker rolling back to the newest committed checkpoint takes it
// from the copy it kept in memory (checkpoint.rollback_in_memory): no disk
// read (the store's reads would wait for a gate never opened), and the
// parameters are those of that step. A checkpoint neither the newest
// written nor the committed one is no longer kept and is read from disk;
// with rollback_in_memory off every rollback reads the disk.
TEST(WorkerServiceTest, ARollbackReadsTheCommittedCopyKeptInMemory) {
  for (const bool in_memory : {true, false}) {
    SCOPED_TRACE(in_memory ? "rollback_in_memory" : "from the store");
    const std::string dir = FreshDir("kept");
    config::SwitchyardConfig config = TestConfig("adamw");
    config.mutable_checkpoint()->set_every(1);
    config.mutable_checkpoint()->set_rollback_in_memory(in_memory);
    const std::vector<DigestsByShard> want = DigestsByStep(config, kSteps);
    auto owned = std::make_unique<GatedReadStore>(
        storage::OpenCheckpointStore(dir, {}).value());
    GatedReadStore* store = owned.get();
    Reported reported;
    WorkerService worker(config, "w");
    // As the coordinator's acks say: each report finds the one before it
    // committed.
    worker.EnableCheckpoints(
        std::move(owned),
        [&, report = reported.Reporter()](const control::CheckpointReport& r) {
          worker.NoteCommitted(r.step() - 1);
          return report(r);
        });
    ASSERT_TRUE(worker.Start().ok());
    ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
    TrainSteps(&worker, 0, kSteps,
               [&](int) { worker.WaitCheckpointsWritten(); });
    // The tables of a rollback to `step`, as the coordinator makes them.
    const auto rollback = [&](uint64_t epoch, int64_t step) {
      control::RoutingTable t = Routing(epoch);
      t.set_resume_step(step);
      const DigestsByShard digests = reported.Get().at(step);
      for (auto& e : *t.mutable_entries()) {
        e.set_resume_holder("w");
        e.set_resume_digest(digests.at(FromShardRef(e.shard()).ToString()));
      }
      return t;
    };
    auto applied = std::async(std::launch::async, [&] {
      return worker.ApplyRouting(rollback(kEpoch + 1, 2));
    });
    if (!in_memory) {
      const auto deadline = std::chrono::steady_clock::now() + Ms(10000);
      while (store->waiting == 0 &&
             std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(Ms(5));
      }
      EXPECT_GT(store->waiting.load(), 0);
      store->open = true;
    }
    ASSERT_EQ(applied.wait_for(std::chrono::seconds(20)),
              std::future_status::ready);
    ASSERT_TRUE(applied.get().ok());
    EXPECT_EQ(store->waiting.load() > 0, !in_memory);
    EXPECT_EQ(worker.next_step(), 2);
    EXPECT_EQ(worker.ShardDigests(), want[2]);
    // Step 1 was neither kept nor committed last: from the store.
    store->open = true;
    const int read_before = store->waiting.load();
    ASSERT_TRUE(worker.ApplyRouting(rollback(kEpoch + 2, 1)).ok());
    EXPECT_GT(store->waiting.load(), read_before);
    EXPECT_EQ(worker.ShardDigests(), want[1]);
    worker.Shutdown();
    std::filesystem::remove_all(dir);
  }
}

}  // namespace
}  // namespace switchyard::expert_worker::worker_testing
