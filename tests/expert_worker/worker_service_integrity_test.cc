// Nothing wrong is trained on or committed: a non-finite gradient (expert
// or dense) stops the step with nothing of it applied, a checkpoint holding
// a non-finite value is never written, checkpoints that keep failing stop
// the run instead of letting it train on unsaved work, and a checkpoint's
// report names the incarnation it was taken under.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/buffer_pool.h"
#include "expert_worker/checkpoint_writer.h"
#include "expert_worker/worker_service.h"
#include "storage/checkpoint_store.h"
#include "tests/expert_worker/worker_test_util.h"

namespace switchyard::expert_worker::worker_testing {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Runs `step` for every rank (AskTogether); the answers, rank by rank (the
// last: rank 1's StepDone, which completes the step).
std::vector<Message> RunStep(WorkerService* worker, int step,
                             const std::function<void(Message*)>& corrupt) {
  std::vector<std::vector<Message>> per_rank;
  for (int r = 0; r < kRanks; ++r) {
    per_rank.push_back(TrainerStep(step, r));
    for (Message& m : per_rank.back()) corrupt(&m);
  }
  std::vector<Message> answers;
  for (auto& rank : AskTogether(worker, std::move(per_rank))) {
    for (Message& a : rank) answers.push_back(std::move(a));
  }
  return answers;
}

// A NaN in one expert's output gradient: the step's last StepDone is
// refused naming the shard and tensor, and no shard changes (the dense ones
// included: the update is all or nothing).
TEST(WorkerServiceTest, ANonFiniteExpertGradientAppliesNothing) {
  WorkerService worker(TestConfig("adamw"), "w");
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  for (const Message& a : RunStep(&worker, 0, [](Message*) {})) {
    ASSERT_EQ(a.header.status_code, 0) << a.error_text;
  }
  const std::string before = worker.ParameterDigest();
  bool corrupted = false;
  const auto answers = RunStep(&worker, 1, [&](Message* m) {
    if (!corrupted &&
        m->header.kind == static_cast<uint8_t>(MessageKind::kExpertBackward) &&
        m->payload.num_elements() > 0) {
      m->payload.f32()[0] = kNaN;
      corrupted = true;
    }
  });
  ASSERT_TRUE(corrupted);
  const Message& last = answers.back();
  ASSERT_EQ(last.header.kind, static_cast<uint8_t>(MessageKind::kStepDone));
  EXPECT_EQ(last.header.status_code,
            static_cast<int32_t>(StatusCode::kInvalidArgument));
  EXPECT_NE(last.error_text.find("refuses update 1"), std::string::npos)
      << last.error_text;
  EXPECT_NE(last.error_text.find("non-finite"), std::string::npos)
      << last.error_text;
  EXPECT_EQ(worker.ParameterDigest(), before);
  worker.Shutdown();
}

TEST(WorkerServiceTest, ANonFiniteDenseGradientIsRefused) {
  WorkerService worker(TestConfig("adamw"), "w");
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  Message push = DenseRequest(MessageKind::kDensePush, 0, 1, 0);
  push.payload.f32()[3] = std::numeric_limits<float>::infinity();
  const Message answer = Ask(&worker, std::move(push));
  EXPECT_EQ(answer.header.status_code,
            static_cast<int32_t>(StatusCode::kInvalidArgument));
  EXPECT_NE(answer.error_text.find("dense gradient of rank 1 for D0"),
            std::string::npos)
      << answer.error_text;
  worker.Shutdown();
}

// Every checkpoint fails (a full disk) and checkpoint.max_consecutive_
// failures is 2: after two failures the next update is refused, naming the
// limit and the last failure, instead of training on unsaved work.
TEST(WorkerServiceTest, CheckpointsThatKeepFailingStopTheRun) {
  const std::string dir = FreshDir("failing");
  config::SwitchyardConfig config = TestConfig("adamw");
  config.mutable_checkpoint()->set_every(1);
  config.mutable_checkpoint()->set_max_consecutive_failures(2);
  auto inner = storage::OpenCheckpointStore(dir, {});
  ASSERT_TRUE(inner.ok());
  auto store = std::make_unique<FullDiskStore>(std::move(inner).value());
  store->full = true;
  WorkerService worker(config, "w");
  worker.EnableCheckpoints(std::move(store), nullptr);
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  for (int step = 0; step < 2; ++step) {
    for (const Message& a : RunStep(&worker, step, [](Message*) {})) {
      ASSERT_EQ(a.header.status_code, 0) << step << ": " << a.error_text;
    }
    worker.WaitCheckpointsWritten();
  }
  const std::string before = worker.ParameterDigest();
  const Message last = RunStep(&worker, 2, [](Message*) {}).back();
  EXPECT_EQ(last.header.status_code,
            static_cast<int32_t>(StatusCode::kResourceExhausted));
  EXPECT_NE(last.error_text.find("the last 2 checkpoints failed"),
            std::string::npos)
      << last.error_text;
  EXPECT_NE(last.error_text.find("checkpoint 2"), std::string::npos)
      << last.error_text;
  EXPECT_EQ(worker.ParameterDigest(), before);
  worker.Shutdown();
  std::filesystem::remove_all(dir);
}

// A checkpoint's report carries the incarnation the worker had in the
// routing table its shards were trained under, not whatever the session
// holds when the write ends: the coordinator then refuses a checkpoint
// taken before a fence.
TEST(WorkerServiceTest,
     CheckpointReportsCarryTheIncarnationTheyWereTakenUnder) {
  const std::string dir = FreshDir("incarnation");
  config::SwitchyardConfig config = TestConfig("adamw");
  config.mutable_checkpoint()->set_every(1);
  auto store = storage::OpenCheckpointStore(dir, {});
  ASSERT_TRUE(store.ok());
  std::mutex mu;
  std::vector<uint64_t> incarnations;
  WorkerService worker(config, "w");
  worker.EnableCheckpoints(std::move(store).value(),
                           [&](const control::CheckpointReport& r) {
                             std::lock_guard<std::mutex> lock(mu);
                             incarnations.push_back(r.incarnation());
                             return OkStatus();
                           });
  ASSERT_TRUE(worker.Start().ok());
  control::RoutingTable routing = Routing(kEpoch);
  routing.mutable_workers(0)->set_incarnation(7);
  ASSERT_TRUE(worker.ApplyRouting(routing).ok());
  for (const Message& a : RunStep(&worker, 0, [](Message*) {})) {
    ASSERT_EQ(a.header.status_code, 0) << a.error_text;
  }
  worker.WaitCheckpointsWritten();
  EXPECT_EQ(incarnations, std::vector<uint64_t>{7});
  worker.Shutdown();
  std::filesystem::remove_all(dir);
}

// A checkpoint holding a NaN is not written, not reported, and counts as a
// failure.
TEST(CheckpointWriterTest, ANonFiniteCheckpointIsNeverWritten) {
  const std::string dir = FreshDir("nonfinite");
  auto store = storage::OpenCheckpointStore(dir, {});
  ASSERT_TRUE(store.ok());
  auto pool = BufferPool::Create(1 << 20);
  std::mutex mu;
  std::vector<int64_t> reported;
  CheckpointWriter writer(
      "w", store->get(), pool.get(), 1,
      [&](const control::CheckpointReport& r) {
        std::lock_guard<std::mutex> lock(mu);
        reported.push_back(r.step());
        return OkStatus();
      },
      nullptr, /*max_consecutive_failures=*/1);
  writer.Start();
  for (int64_t step : {1, 2}) {
    storage::ShardSnapshot snapshot;
    snapshot.shard = "L0.E0.S0";
    snapshot.step = step;
    Tensor w1 = Tensor::Zeros(DType::kF32, {4, 4}).value();
    if (step == 2) w1.f32()[5] = kNaN;
    snapshot.tensors.push_back({"w1", std::move(w1)});
    writer.Stage({std::move(snapshot)}, /*run_ends=*/true);
    writer.WaitWritten();
  }
  EXPECT_EQ(reported, std::vector<int64_t>{1});
  EXPECT_EQ((*store)->Manifests(2)->size(), 0u);
  const Status healthy = writer.Healthy();
  EXPECT_EQ(healthy.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(healthy.message().find("L0.E0.S0 tensor w1 holds a non-finite"),
            std::string::npos)
      << healthy.ToString();
  writer.Shutdown();
  std::filesystem::remove_all(dir);
}

// The coordinator is away (restarting) while checkpoints are written:
// their reports are kept and sent again, oldest first, once it is back,
// and unreachable reports are no checkpoint failures (training goes on).
TEST(CheckpointWriterTest, ReportsWaitForTheCoordinatorToComeBack) {
  const std::string dir = FreshDir("away");
  auto store = storage::OpenCheckpointStore(dir, {});
  ASSERT_TRUE(store.ok());
  auto pool = BufferPool::Create(1 << 20);
  std::mutex mu;
  bool away = true;
  int refused = 0;
  std::vector<int64_t> reported;
  CheckpointWriter writer(
      "w", store->get(), pool.get(), 1,
      [&](const control::CheckpointReport& r) {
        std::lock_guard<std::mutex> lock(mu);
        if (away) {
          ++refused;
          return UnavailableError("no connection to the coordinator");
        }
        reported.push_back(r.step());
        return OkStatus();
      },
      nullptr, /*max_consecutive_failures=*/1);
  writer.Start();
  auto write = [&](int64_t step) {
    storage::ShardSnapshot snapshot;
    snapshot.shard = "L0.E0.S0";
    snapshot.step = step;
    snapshot.tensors.push_back(
        {"w1", Tensor::Zeros(DType::kF32, {4, 4}).value()});
    writer.Stage({std::move(snapshot)}, /*run_ends=*/true);
    writer.WaitWritten();
    EXPECT_TRUE(writer.Healthy().ok()) << writer.Healthy().ToString();
  };
  for (int64_t step : {1, 2, 3}) write(step);
  EXPECT_EQ((*store)->Manifests(3)->size(), 1u);
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_GE(refused, 1);
    EXPECT_TRUE(reported.empty());
    away = false;
  }
  // The next checkpoint's report takes the waiting ones along, in order,
  // even with no idle moment for the timed retry.
  write(4);
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(reported, (std::vector<int64_t>{1, 2, 3, 4}));
  }
  writer.Shutdown();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace switchyard::expert_worker::worker_testing
