// A worker's checkpoint writer: checkpoints staged at a step boundary hold
// exactly that step's values however late they are copied or written,
// staging memory is resident or not as configured, and the run's last
// checkpoint is queued behind a write in flight, not waited for.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "expert_worker/worker_service.h"
#include "storage/checkpoint_store.h"
#include "tests/expert_worker/worker_test_util.h"
#include "transport/local/in_process_data_plane.h"

namespace switchyard::expert_worker::worker_testing {
namespace {

// A checkpoint is taken at the step boundary as references to the live
// tensors and copied while the next step's requests are served; the next
// update waits for that copy. With a checkpoint due at every step and no
// waiting between steps (but for the first write to begin, so that at
// least one checkpoint before the run's last is written), every checkpoint
// written holds exactly its step's values (the digests a worker without
// checkpoints has at that step).
TEST(WorkerServiceTest, CheckpointsCopiedDuringTheNextStepHoldTheirStep) {
  const std::string dir = FreshDir("copy");
  constexpr int kManySteps = 12;
  config::SwitchyardConfig config = TestConfig("adamw");
  config.mutable_training()->set_steps(kManySteps);
  const std::vector<DigestsByShard> expected =
      DigestsByStep(config, kManySteps);
  config.mutable_checkpoint()->set_every(1);
  auto inner = storage::OpenCheckpointStore(dir, {});
  ASSERT_TRUE(inner.ok());
  auto owned = std::make_unique<GatedWriteStore>(std::move(inner).value());
  GatedWriteStore* store = owned.get();
  store->open = true;  // Writes go through; the store counts them begun.
  Reported reported;
  const uint64_t written_before =
      CounterValue("switchyard_worker_checkpoints_written_total");
  const uint64_t skipped_before =
      CounterValue("switchyard_worker_checkpoints_skipped_total");
  WorkerService worker(config, "w");
  worker.EnableCheckpoints(std::move(owned), reported.Reporter());
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  // Step 0, then checkpoint 1's write begins (under load the thread could
  // otherwise sleep through every step, and the run's last checkpoint
  // replace an unbegun checkpoint 1); no waiting for checkpoints after.
  TrainSteps(&worker, 0, 1);
  ASSERT_TRUE(store->WaitForAWrite()) << "checkpoint 1's write never began";
  TrainSteps(&worker, 1, kManySteps);
  worker.WaitCheckpointsWritten();
  EXPECT_EQ(worker.ShardDigests(), expected[kManySteps]);
  worker.Shutdown();
  const auto got = reported.Get();
  EXPECT_GE(got.size(), 2u);  // Some are skipped while one writes.
  // Every checkpoint due is counted as written or as skipped.
  const uint64_t written =
      CounterValue("switchyard_worker_checkpoints_written_total") -
      written_before;
  EXPECT_EQ(written, got.size());
  EXPECT_EQ(written +
                CounterValue("switchyard_worker_checkpoints_skipped_total") -
                skipped_before,
            static_cast<uint64_t>(kManySteps));
  EXPECT_TRUE(got.count(kManySteps)) << "the run's last step";
  ExpectEachMatches(got, expected);
  std::filesystem::remove_all(dir);
}

// The checkpoint thread is busy (a replication whose source has not
// answered) when a checkpoint is staged, so nobody has copied it when the
// next update comes: that update copies it before it changes anything, and
// the checkpoint, written once the thread is free, holds its own step.
TEST(WorkerServiceTest, AnUpdateCopiesACheckpointTheBusyThreadHasNotTaken) {
  const std::string dir = FreshDir("busy");
  constexpr int kFewSteps = 3;
  config::SwitchyardConfig config = TestConfig("adamw");
  config.mutable_training()->set_steps(kFewSteps);
  config.mutable_transport()->set_request_timeout_ms(60000);
  const std::vector<DigestsByShard> expected = DigestsByStep(config, kFewSteps);
  config.mutable_checkpoint()->set_every(1);

  // The replication source: a real peer that holds its answers back.
  std::mutex source_mu;
  std::condition_variable source_cv;
  // GUARDED_BY(source_mu)
  std::vector<std::pair<transport::WireHeader, transport::Reply>> held;
  auto source = transport::NewInProcessDataPlane();
  ASSERT_TRUE(source
                  ->Start([&](Message m, transport::Reply reply) {
                    std::lock_guard<std::mutex> lock(source_mu);
                    held.emplace_back(m.header, std::move(reply));
                    source_cv.notify_all();
                  })
                  .ok());
  auto peers = transport::NewInProcessDataPlane();
  ASSERT_TRUE(peers->Start(nullptr).ok());

  auto store = storage::OpenCheckpointStore(dir, {});
  ASSERT_TRUE(store.ok());
  Reported reported;
  WorkerService worker(config, "w");
  worker.EnableCheckpoints(std::move(store).value(), reported.Reporter());
  worker.SetPeerPlane(peers.get());
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());

  control::ReplicationTask task;
  task.set_step(7);
  task.set_source("elsewhere");
  task.set_source_address(source->address());
  *task.add_shards() = Routing(kEpoch).entries(0).shard();
  worker.Replicate(task);
  {
    // The checkpoint thread now waits in that fetch.
    std::unique_lock<std::mutex> lock(source_mu);
    ASSERT_TRUE(
        source_cv.wait_for(lock, Ms(10000), [&] { return !held.empty(); }));
  }
  // Checkpoint 1 is staged at step 0's update and copied by step 1's
  // update, while the fetch is unanswered.
  TrainSteps(&worker, 0, 2);
  EXPECT_EQ(worker.next_step(), 2);
  {
    std::lock_guard<std::mutex> lock(source_mu);
    // One request per tensor of the shard, none answered yet.
    EXPECT_FALSE(held.empty()) << "the fetch was still unanswered";
    for (auto& [header, reply] : held) {
      reply(transport::ErrorResponse(header,
                                     UnavailableError("the source let go")));
    }
    held.clear();
  }
  worker.WaitCheckpointsWritten();  // Checkpoint 1.
  TrainSteps(&worker, 2, kFewSteps);
  worker.WaitCheckpointsWritten();
  EXPECT_EQ(worker.ShardDigests(), expected[kFewSteps]);
  worker.Shutdown();
  peers->Shutdown();
  source->Shutdown();
  const auto got = reported.Get();
  ASSERT_TRUE(got.count(1)) << "checkpoint 1 was written";
  EXPECT_TRUE(got.count(kFewSteps)) << "the run's last step";
  ExpectEachMatches(got, expected);
  std::filesystem::remove_all(dir);
}

// checkpoint.staging_resident false: no staging memory is held between
// checkpoints (none made with the shards, all returned after each write),
// and the checkpoints are the same as with resident staging.
TEST(WorkerServiceTest, NonResidentStagingHoldsNoMemoryBetweenCheckpoints) {
  const std::string dir = FreshDir("staging");
  std::map<bool, std::string> digests;  // By staging_resident.
  for (bool resident : {true, false}) {
    config::SwitchyardConfig config = TestConfig("adamw");
    config.mutable_checkpoint()->set_every(1);
    config.mutable_checkpoint()->set_staging_resident(resident);
    // Not kept for rollbacks: a kept copy holds its staging buffers out of
    // the idle cache measured here (ARollbackReadsTheCommittedCopyKept...).
    config.mutable_checkpoint()->set_rollback_in_memory(false);
    const std::string store_dir = dir + (resident ? "/resident" : "/not");
    {
      auto store = storage::OpenCheckpointStore(store_dir, {});
      ASSERT_TRUE(store.ok());
      WorkerService worker(config, "w");
      worker.EnableCheckpoints(std::move(store).value(), nullptr);
      ASSERT_TRUE(worker.Start().ok());
      ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
      EXPECT_EQ(worker.StagingCachedBytes() > 0, resident);
      for (int step = 0; step < kSteps; ++step) {
        StepTogether(&worker, step);
        worker.WaitCheckpointsWritten();
        EXPECT_EQ(worker.StagingCachedBytes() > 0, resident) << step;
      }
      worker.Shutdown();
    }  // The worker, and its store, are gone.
    // The last checkpoint, read back: every tensor of every shard.
    auto reopened = storage::OpenCheckpointStore(store_dir, {});
    ASSERT_TRUE(reopened.ok());
    auto manifests = (*reopened)->Manifests(kSteps);
    ASSERT_TRUE(manifests.ok());
    ASSERT_EQ(manifests->size(), 6u);
    std::string all;
    for (const auto& m : *manifests) {
      auto shard = (*reopened)->ReadShard(kSteps, m.shard());
      ASSERT_TRUE(shard.ok()) << shard.status().ToString();
      for (const auto& t : shard->tensors) {
        all += t.name;
        all.append(static_cast<const char*>(t.tensor.data()),
                   t.tensor.num_bytes());
      }
    }
    digests[resident] = all;
  }
  EXPECT_EQ(digests[true], digests[false]);
  std::filesystem::remove_all(dir);
}

// The run's last checkpoint, due while the previous one is still being
// written, is queued behind that write: the last update (which answers the
// trainers' StepDone) does not wait for the disk, and both checkpoints are
// written, each holding its own step.
TEST(WorkerServiceTest, TheRunsLastCheckpointIsQueuedNotWaitedFor) {
  const std::string dir = FreshDir("last");
  constexpr int kSteps3 = 3;
  config::SwitchyardConfig config = TestConfig("adamw");
  config.mutable_training()->set_steps(kSteps3);
  const std::vector<DigestsByShard> expected = DigestsByStep(config, kSteps3);
  config.mutable_checkpoint()->set_every(2);  // Checkpoints 2 and 3 (end).
  auto inner = storage::OpenCheckpointStore(dir, {});
  ASSERT_TRUE(inner.ok());
  auto owned = std::make_unique<GatedWriteStore>(std::move(inner).value());
  GatedWriteStore* store = owned.get();
  Reported reported;
  WorkerService worker(config, "w");
  worker.EnableCheckpoints(std::move(owned), reported.Reporter());
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  // Checkpoint 2's write begins (and waits); only then the last step, so
  // that the run's last checkpoint is due while a write is in flight (had
  // the checkpoint thread not begun, the last would replace checkpoint 2).
  TrainSteps(&worker, 0, 2);
  ASSERT_TRUE(store->WaitForAWrite()) << "checkpoint 2's write never began";
  TrainSteps(&worker, 2, kSteps3);
  EXPECT_EQ(worker.next_step(), kSteps3);
  EXPECT_TRUE(reported.Get().empty()) << "nothing written yet";
  store->open = true;
  worker.WaitCheckpointsWritten();
  worker.Shutdown();
  const auto got = reported.Get();
  EXPECT_EQ(got.size(), 2u);
  for (int step : {2, kSteps3}) {
    EXPECT_TRUE(got.count(step)) << "checkpoint " << step;
  }
  ExpectEachMatches(got, expected);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace switchyard::expert_worker::worker_testing
