// The worker's step protocol: the same requests in different arrival orders
// and thread interleavings give bit-identical parameters, and every invalid
// request is refused with its reason while the worker keeps serving.
#include "expert_worker/worker_service.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <optional>
#include <random>
#include <thread>

#include "common/config.h"
#include "common/metrics.h"
#include "common/model_shape.h"
#include "common/random.h"
#include "common/shard_ref.h"
#include "storage/safetensors.h"
#include "tests/testing/files.h"
#include "transport/local/in_process_data_plane.h"

namespace switchyard::expert_worker {
namespace {

using transport::Message;
using transport::MessageKind;
using Ms = std::chrono::milliseconds;

constexpr uint64_t kEpoch = 5;
constexpr int kSteps = 3, kRanks = 2, kMicroBatches = 2;

config::SwitchyardConfig TestConfig(const std::string& optimizer,
                                    int dense_shards = 2,
                                    const std::string& dtype = "fp32") {
  auto loaded = ParseConfig(
      "", "test",
      {"cluster.trainers=2", "model.num_layers=2", "model.moe_every=2",
       "model.num_experts=2", "model.shards_per_expert=2", "model.d_model=8",
       "model.d_ff=16", "model.num_heads=2", "model.seq_len=16",
       "model.vocab_size=32", "training.threads=1",
       "training.optimizer=" + optimizer, "training.warmup_steps=0",
       "model.dense_shards=" + std::to_string(dense_shards),
       "training.compute_dtype=" + dtype});
  CHECK(loaded.ok()) << loaded.status().ToString();
  return loaded->config;
}

control::RoutingTable Routing(uint64_t epoch, int dense_shards = 2) {
  control::RoutingTable t;
  t.set_epoch(epoch);
  t.add_workers()->set_name("w");
  for (int d = 0; d < dense_shards; ++d) {
    auto* entry = t.add_entries();
    entry->mutable_shard()->set_kind(control::DENSE);
    entry->mutable_shard()->set_shard(d);
    entry->set_worker(0);
  }
  for (int e = 0; e < 2; ++e) {
    for (int s = 0; s < 2; ++s) {
      auto* entry = t.add_entries();
      entry->mutable_shard()->set_kind(control::EXPERT);
      entry->mutable_shard()->set_layer(0);
      entry->mutable_shard()->set_expert(e);
      entry->mutable_shard()->set_shard(s);
      entry->set_worker(0);
    }
  }
  return t;
}

// Tokens that (step, rank, mb) routes to expert e: sometimes none.
int Tokens(int step, int rank, int mb, int expert) {
  return static_cast<int>(
      RandomBits(9,
                 {static_cast<uint64_t>(step), static_cast<uint64_t>(rank),
                  static_cast<uint64_t>(mb), static_cast<uint64_t>(expert)}) %
      6);
}

Message Request(MessageKind kind, int step, int rank, int mb, int expert,
                int shard, uint64_t epoch = kEpoch, int tokens = -1) {
  Message m;
  m.header.kind = static_cast<uint8_t>(kind);
  m.header.step = step;
  m.header.trainer_rank = rank;
  m.header.micro_batch = mb;
  m.header.layer = 0;
  m.header.expert = kind == MessageKind::kStepDone ? -1 : expert;
  m.header.shard = shard;
  m.header.epoch = epoch;
  if (kind == MessageKind::kStepDone) return m;
  const int t = tokens >= 0 ? tokens : Tokens(step, rank, mb, expert);
  m.payload = Tensor::Zeros(DType::kF32, {t, 8}).value();
  for (int i = 0; i < t * 8; ++i) {
    m.payload.f32()[i] = static_cast<float>(RandomNormal(
        3, {static_cast<uint64_t>(kind), static_cast<uint64_t>(step),
            static_cast<uint64_t>(rank), static_cast<uint64_t>(mb),
            static_cast<uint64_t>(expert), static_cast<uint64_t>(i)}));
  }
  m.header.dtype = static_cast<uint8_t>(DType::kF32);
  m.header.rows = t;
  m.header.cols = 8;
  m.header.payload_bytes = m.payload.num_bytes();
  return m;
}

int64_t DenseCount(int shard) {
  return DenseShardRange(TestConfig("adamw").model(), shard).count;
}

Message DenseRequest(MessageKind kind, int step, int rank, int shard,
                     uint64_t epoch = kEpoch) {
  Message m;
  m.header.kind = static_cast<uint8_t>(kind);
  m.header.step = step;
  m.header.trainer_rank = rank;
  m.header.expert = -1;
  m.header.shard = shard;
  m.header.epoch = epoch;
  if (kind == MessageKind::kDensePush) {
    const int64_t n = DenseCount(shard);
    m.payload = Tensor::Zeros(DType::kF32, {1, n}).value();
    for (int64_t i = 0; i < n; ++i) {
      m.payload.f32()[i] = static_cast<float>(RandomNormal(
          4, {static_cast<uint64_t>(step), static_cast<uint64_t>(rank),
              static_cast<uint64_t>(shard), static_cast<uint64_t>(i)}));
    }
    m.header.dtype = static_cast<uint8_t>(DType::kF32);
    m.header.rows = 1;
    m.header.cols = n;
    m.header.payload_bytes = m.payload.num_bytes();
  }
  return m;
}

// One trainer's requests for one step, in the order a trainer sends them:
// pull the dense tables, the expert traffic, push dense gradients, StepDone.
std::vector<Message> TrainerStep(int step, int rank) {
  std::vector<Message> out;
  for (int d = 0; d < 2; ++d) {
    out.push_back(DenseRequest(MessageKind::kDensePull, step, rank, d));
  }
  for (int mb = 0; mb < kMicroBatches; ++mb) {
    for (int e = 0; e < 2; ++e) {
      for (int s = 0; s < 2; ++s) {
        out.push_back(
            Request(MessageKind::kExpertForward, step, rank, mb, e, s));
      }
    }
    for (int e = 1; e >= 0; --e) {
      for (int s = 0; s < 2; ++s) {
        out.push_back(
            Request(MessageKind::kExpertBackward, step, rank, mb, e, s));
      }
    }
  }
  for (int d = 1; d >= 0; --d) {
    out.push_back(DenseRequest(MessageKind::kDensePush, step, rank, d));
  }
  out.push_back(Request(MessageKind::kStepDone, step, rank, 0, 0, 0));
  return out;
}

// Collects replies; Wait() returns the failures.
class Replies {
 public:
  transport::Reply Make() {
    ++expected_;
    return [this](Message r) {
      std::lock_guard<std::mutex> lock(mu_);
      if (r.header.status_code != 0) errors_.push_back(r.error_text);
      ++received_;
      cv_.notify_all();
    };
  }
  std::vector<std::string> Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    EXPECT_TRUE(cv_.wait_for(lock, std::chrono::seconds(30),
                             [this] { return received_ == expected_; }));
    return errors_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int expected_ = 0, received_ = 0;
  std::vector<std::string> errors_;
};

// Feeds every trainer's steps, interleaving the two trainers' request streams
// at random (seed) or, with seed 0, trainer 1 first whenever it may go. As
// with real trainers, a trainer runs at most one step ahead of the slowest
// one (it cannot send step t + 2 before its step t + 1 forwards are
// answered, which needs update t), so requests for the next step do arrive
// before the update and must wait for it.
std::string RunInterleaved(const std::string& optimizer, uint32_t seed,
                           const std::string& dtype = "fp32") {
  WorkerService worker(TestConfig(optimizer, 2, dtype), "w");
  EXPECT_TRUE(worker.Start().ok());
  EXPECT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  Replies replies;
  std::vector<std::deque<Message>> streams(kRanks);
  for (int step = 0; step < kSteps; ++step) {
    for (int r = 0; r < kRanks; ++r) {
      for (auto& m : TrainerStep(step, r)) streams[r].push_back(std::move(m));
    }
  }
  std::vector<int64_t> done(kRanks, 0);  // StepDones sent per rank.
  auto eligible = [&](int r) {
    return !streams[r].empty() && streams[r].front().header.step <= done[1 - r];
  };
  std::mt19937 rng(seed);
  while (!streams[0].empty() || !streams[1].empty()) {
    int r = seed == 0 ? 1 : static_cast<int>(rng() % 2);
    if (!eligible(r)) r = 1 - r;
    CHECK(eligible(r));
    Message m = std::move(streams[r].front());
    streams[r].pop_front();
    if (m.header.kind == static_cast<uint8_t>(MessageKind::kStepDone))
      ++done[r];
    worker.Handle(std::move(m), replies.Make());
  }
  EXPECT_TRUE(replies.Wait().empty());
  EXPECT_EQ(worker.next_step(), kSteps);
  return worker.ParameterDigest();
}

TEST(WorkerServiceTest, ArrivalOrderDoesNotChangeTheResult) {
  for (const char* optimizer : {"adamw", "adafactor"}) {
    const std::string reference = RunInterleaved(optimizer, 0);
    for (uint32_t seed = 1; seed <= 6; ++seed) {
      EXPECT_EQ(RunInterleaved(optimizer, seed), reference)
          << optimizer << " seed " << seed;
    }
  }
}

TEST(WorkerServiceTest, Bf16ComputeIsAlsoOrderIndependent) {
  const std::string reference = RunInterleaved("adamw", 0, "bf16");
  EXPECT_NE(reference, RunInterleaved("adamw", 0, "fp32"));
  for (uint32_t seed = 1; seed <= 3; ++seed) {
    EXPECT_EQ(RunInterleaved("adamw", seed, "bf16"), reference) << seed;
  }
}

TEST(WorkerServiceTest, ThreadInterleavingsDoNotChangeTheResult) {
  const std::string reference = RunInterleaved("adamw", 0);
  for (int run = 0; run < 4; ++run) {
    WorkerService worker(TestConfig("adamw"), "w");
    ASSERT_TRUE(worker.Start().ok());
    ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
    std::vector<std::thread> trainers;
    for (int r = 0; r < kRanks; ++r) {
      trainers.emplace_back([&, r] {
        std::mt19937 rng(run * 10 + r);
        for (int step = 0; step < kSteps; ++step) {
          // Like a trainer: a step's answers come before the next step.
          Replies replies;
          for (auto& m : TrainerStep(step, r)) {
            worker.Handle(std::move(m), replies.Make());
            if (rng() % 3 == 0) std::this_thread::yield();
          }
          EXPECT_TRUE(replies.Wait().empty());
        }
      });
    }
    for (auto& t : trainers) t.join();
    EXPECT_EQ(worker.ParameterDigest(), reference) << "run " << run;
  }
}

TEST(WorkerServiceTest, TrainingChangesParametersDeterministically) {
  WorkerService fresh(TestConfig("adamw"), "w");
  ASSERT_TRUE(fresh.Start().ok());
  ASSERT_TRUE(fresh.ApplyRouting(Routing(kEpoch)).ok());
  // Initial values are a function of the seed only: two fresh workers agree.
  WorkerService again(TestConfig("adamw"), "w");
  ASSERT_TRUE(again.Start().ok());
  ASSERT_TRUE(again.ApplyRouting(Routing(kEpoch)).ok());
  EXPECT_EQ(fresh.ParameterDigest(), again.ParameterDigest());
  EXPECT_NE(fresh.ParameterDigest(), RunInterleaved("adamw", 0));
}

TEST(WorkerServiceTest, RefusesInvalidRequestsAndKeepsServing) {
  WorkerService worker(TestConfig("adamw"), "w");
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  auto send = [&](Message m) {
    std::promise<Message> p;
    auto f = p.get_future();
    worker.Handle(std::move(m), [&p](Message r) { p.set_value(std::move(r)); });
    EXPECT_EQ(f.wait_for(Ms(10000)), std::future_status::ready);
    return f.get();
  };
  struct Case {
    const char* what;
    Message request;
    StatusCode code;
    const char* fragment;
  };
  Message wrong_width = Request(MessageKind::kExpertForward, 0, 0, 0, 0, 0);
  wrong_width.payload = Tensor::Zeros(DType::kF32, {2, 5}).value();
  std::vector<Case> cases;
  cases.push_back(
      {"stale epoch",
       Request(MessageKind::kExpertForward, 0, 0, 0, 0, 0, kEpoch - 1),
       StatusCode::kFailedPrecondition, "stale epoch 4"});
  cases.push_back(
      {"future epoch",
       Request(MessageKind::kExpertForward, 0, 0, 0, 0, 0, kEpoch + 1),
       StatusCode::kAborted, "has not seen epoch 6"});
  cases.push_back({"unknown shard",
                   Request(MessageKind::kExpertForward, 0, 0, 0, 7, 0),
                   StatusCode::kNotFound, "shard L0.E7.S0 is not hosted by w"});
  cases.push_back(
      {"step ahead", Request(MessageKind::kExpertForward, 2, 0, 0, 0, 0),
       StatusCode::kFailedPrecondition, "step 2 is ahead of step 0"});
  cases.push_back({"bad rank",
                   Request(MessageKind::kExpertForward, 0, 5, 0, 0, 0),
                   StatusCode::kInvalidArgument, "trainer rank 5 is outside"});
  cases.push_back({"wrong width", std::move(wrong_width),
                   StatusCode::kInvalidArgument,
                   "is not (tokens, d_model = 8)"});
  cases.push_back(
      {"backward first", Request(MessageKind::kExpertBackward, 0, 1, 0, 0, 0),
       StatusCode::kFailedPrecondition, "backward without a forward"});
  cases.push_back({"echo kind", Request(MessageKind::kEcho, 0, 0, 0, 0, 0),
                   StatusCode::kInvalidArgument, "a worker does not serve"});
  for (Case& c : cases) {
    Message r = send(std::move(c.request));
    EXPECT_EQ(r.header.status_code, static_cast<int32_t>(c.code)) << c.what;
    EXPECT_NE(r.error_text.find(c.fragment), std::string::npos)
        << c.what << ": " << r.error_text;
  }
  // A full step still works, and afterwards step 0 is refused as applied.
  Message fwd =
      send(Request(MessageKind::kExpertForward, 0, 0, 0, 0, 0, kEpoch, 3));
  EXPECT_EQ(fwd.header.status_code, 0) << fwd.error_text;
  EXPECT_EQ(fwd.payload.dim(0), 3);
  Message dup =
      send(Request(MessageKind::kExpertForward, 0, 0, 0, 0, 0, kEpoch, 3));
  EXPECT_EQ(dup.header.status_code,
            static_cast<int32_t>(StatusCode::kAlreadyExists));
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_EQ(
        send(Request(MessageKind::kStepDone, 0, r, 0, 0, 0)).header.status_code,
        0);
  }
  EXPECT_EQ(worker.next_step(), 1);
  Message late = send(Request(MessageKind::kExpertForward, 0, 1, 0, 0, 0));
  EXPECT_NE(late.error_text.find("step 0 is already applied"),
            std::string::npos)
      << late.error_text;
}

// Sends one request and waits for its answer.
Message Ask(WorkerService* worker, Message m) {
  std::promise<Message> p;
  auto f = p.get_future();
  worker->Handle(std::move(m), [&p](Message r) { p.set_value(std::move(r)); });
  EXPECT_EQ(f.wait_for(Ms(10000)), std::future_status::ready);
  return f.get();
}

// An empty directory of this test process, named after `tag`.
std::string FreshDir(const std::string& tag) {
  const std::string dir = ::testing::TempDir() + "/switchyard_ws_" + tag + "_" +
                          std::to_string(::getpid());
  std::filesystem::remove_all(dir);
  return dir;
}

// The value of a process-wide counter (common/metrics.h).
uint64_t CounterValue(const std::string& name) {
  return MetricsRegistry::Global().GetCounter(name)->value();
}

// The fault-injection seam: a real store whose writes fail with
// RESOURCE_EXHAUSTED (a full disk) while `full` is set.
class FullDiskStore : public storage::CheckpointStore {
 public:
  explicit FullDiskStore(std::unique_ptr<storage::CheckpointStore> inner)
      : inner_(std::move(inner)) {}
  std::atomic<bool> full{false};

  StatusOr<checkpoint::ShardManifest> WriteShard(
      const storage::ShardSnapshot& s) override {
    if (full) return ResourceExhaustedError("No space left on device");
    return inner_->WriteShard(s);
  }
  StatusOr<storage::ShardSnapshot> ReadShard(
      int64_t step, const std::string& shard) override {
    return inner_->ReadShard(step, shard);
  }
  Status ReadShardInto(int64_t step, const std::string& shard,
                       storage::ShardSnapshot* into) override {
    return inner_->ReadShardInto(step, shard, into);
  }
  StatusOr<std::vector<checkpoint::ShardManifest>> Manifests(
      std::optional<int64_t> step) override {
    return inner_->Manifests(step);
  }
  Status DropSteps(int64_t first, int64_t end) override {
    return inner_->DropSteps(first, end);
  }
  Status VerifyFiles() override { return inner_->VerifyFiles(); }

 private:
  std::unique_ptr<storage::CheckpointStore> inner_;
};

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
      for (int r = 0; r < kRanks; ++r) {
        for (auto& m : TrainerStep(step, r)) {
          EXPECT_EQ(Ask(&worker, std::move(m)).header.status_code, 0);
        }
      }
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

// Trains `worker` through steps [first, end) with every rank's requests;
// after_step(step) follows each step.
void TrainSteps(
    WorkerService* worker, int first, int end,
    const std::function<void(int)>& after_step = [](int) {}) {
  for (int step = first; step < end; ++step) {
    for (int r = 0; r < kRanks; ++r) {
      for (auto& m : TrainerStep(step, r)) {
        EXPECT_EQ(Ask(worker, std::move(m)).header.status_code, 0);
      }
    }
    after_step(step);
  }
}

using DigestsByShard = std::map<std::string, std::string>;

// The shard digests of a worker without checkpoints after each of `steps`
// steps of `config` (index: steps done).
std::vector<DigestsByShard> DigestsByStep(
    const config::SwitchyardConfig& config, int steps) {
  std::vector<DigestsByShard> expected(steps + 1);
  WorkerService reference(config, "w");
  EXPECT_TRUE(reference.Start().ok());
  EXPECT_TRUE(reference.ApplyRouting(Routing(kEpoch)).ok());
  TrainSteps(&reference, 0, steps,
             [&](int step) { expected[step + 1] = reference.ShardDigests(); });
  reference.Shutdown();
  return expected;
}

// What a worker reported of its checkpoints: digests by step and shard.
struct Reported {
  std::mutex mu;
  std::map<int64_t, DigestsByShard> digests;  // GUARDED_BY(mu)

  // A copy of what was reported so far.
  std::map<int64_t, DigestsByShard> Get() {
    std::lock_guard<std::mutex> lock(mu);
    return digests;
  }

  WorkerService::CheckpointReporter Reporter() {
    return [this](const control::CheckpointReport& r) {
      std::lock_guard<std::mutex> lock(mu);
      for (const auto& shard : r.shards()) {
        digests[r.step()][FromShardRef(shard.shard()).ToString()] =
            shard.digest();
      }
      return OkStatus();
    };
  }
};

// Every reported checkpoint holds the digests of its step in `expected`.
void ExpectEachMatches(const std::map<int64_t, DigestsByShard>& reported,
                       const std::vector<DigestsByShard>& expected) {
  for (const auto& [step, digests] : reported) {
    EXPECT_EQ(digests, expected[step]) << "checkpoint " << step;
  }
}

// A checkpoint is taken at the step boundary as references to the live
// tensors and copied while the next step's requests are served; the next
// update waits for that copy. With a checkpoint due at every step and no
// waiting between steps, every checkpoint written holds exactly its step's
// values (the digests a worker without checkpoints has at that step).
TEST(WorkerServiceTest, CheckpointsCopiedDuringTheNextStepHoldTheirStep) {
  const std::string dir = FreshDir("copy");
  constexpr int kManySteps = 12;
  config::SwitchyardConfig config = TestConfig("adamw");
  config.mutable_training()->set_steps(kManySteps);
  const std::vector<DigestsByShard> expected =
      DigestsByStep(config, kManySteps);
  config.mutable_checkpoint()->set_every(1);
  auto store = storage::OpenCheckpointStore(dir, {});
  ASSERT_TRUE(store.ok());
  Reported reported;
  const uint64_t written_before =
      CounterValue("switchyard_worker_checkpoints_written_total");
  const uint64_t skipped_before =
      CounterValue("switchyard_worker_checkpoints_skipped_total");
  WorkerService worker(config, "w");
  worker.EnableCheckpoints(std::move(store).value(), reported.Reporter());
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  // No waiting for checkpoints between steps.
  TrainSteps(&worker, 0, kManySteps);
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
        for (int r = 0; r < kRanks; ++r) {
          for (auto& m : TrainerStep(step, r)) {
            EXPECT_EQ(Ask(&worker, std::move(m)).header.status_code, 0);
          }
        }
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

// A store whose reads wait until `open` is set: a restore that takes as long
// as the test likes.
class GatedReadStore : public FullDiskStore {
 public:
  using FullDiskStore::FullDiskStore;
  std::atomic<bool> open{false};
  std::atomic<int> waiting{0};

  Status ReadShardInto(int64_t step, const std::string& shard,
                       storage::ShardSnapshot* into) override {
    ++waiting;
    const auto deadline = std::chrono::steady_clock::now() + Ms(30000);
    while (!open && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(Ms(5));
    }
    return FullDiskStore::ReadShardInto(step, shard, into);
  }
};

// A store whose writes wait until `open` is set: a checkpoint write that
// takes as long as the test likes.
class GatedWriteStore : public FullDiskStore {
 public:
  using FullDiskStore::FullDiskStore;
  std::atomic<bool> open{false};
  std::atomic<int> writing{0};  // Writes begun.

  StatusOr<checkpoint::ShardManifest> WriteShard(
      const storage::ShardSnapshot& s) override {
    ++writing;
    const auto deadline = std::chrono::steady_clock::now() + Ms(30000);
    while (!open && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(Ms(5));
    }
    return FullDiskStore::WriteShard(s);
  }
};

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
  const auto deadline = std::chrono::steady_clock::now() + Ms(30000);
  while (store->writing == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(5));
  }
  ASSERT_GT(store->writing.load(), 0) << "checkpoint 2's write never began";
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
    for (int r = 0; r < kRanks; ++r) {
      for (auto& m : TrainerStep(0, r)) {
        EXPECT_EQ(Ask(&writer, std::move(m)).header.status_code, 0);
      }
    }
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

// checkpoint.init_from: dense tensors by name, an expert from its own
// tensors, another upcycled from the layer's dense FFN, each shard taking
// its columns (W1, b1) and rows (W2) of d_ff; b2 on shard 0.
TEST(WorkerServiceTest, InitialisesFromSafetensorsWithUpcycling) {
  const std::string path = ::testing::TempDir() + "/switchyard_init_" +
                           std::to_string(::getpid()) + ".safetensors";
  std::mt19937 rng(3);
  auto random = [&](std::vector<int64_t> shape) {
    Tensor t = Tensor::Zeros(DType::kF32, shape).value();
    for (int64_t i = 0; i < t.num_elements(); ++i) {
      t.f32()[i] = static_cast<float>(rng() % 1000) / 100.0f;
    }
    return t;
  };
  // d_model 8, d_ff 16, 2 experts of 2 shards; layer 1 is the MoE layer.
  const Tensor tok = random({32, 8});
  const Tensor ffn_w1 = random({8, 16}), ffn_b1 = random({16}),
               ffn_w2 = random({16, 8}), ffn_b2 = random({8});
  const Tensor e1_w1 = random({8, 16}), e1_w2 = random({16, 8});
  ASSERT_TRUE(storage::WriteSafetensors(path,
                                        {{"tok_embed", tok},
                                         {"layers.1.ffn.w1", ffn_w1},
                                         {"layers.1.ffn.b1", ffn_b1},
                                         {"layers.1.ffn.w2", ffn_w2},
                                         {"layers.1.ffn.b2", ffn_b2},
                                         {"layers.1.experts.1.w1", e1_w1},
                                         {"layers.1.experts.1.w2", e1_w2}},
                                        {})
                  .ok());
  config::SwitchyardConfig config = TestConfig("adamw");
  config.mutable_checkpoint()->set_init_from(path);
  WorkerService worker(config, "w");
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  std::map<std::string, std::map<std::string, Tensor>> got;
  for (auto& s : worker.Snapshots()) {
    for (auto& t : s.tensors) got[s.shard][t.name] = t.tensor;
  }
  // Dense: tok_embed is the first 32 x 8 values of D0.
  EXPECT_EQ(std::memcmp(got["D0"]["params"].f32(), tok.f32(), tok.num_bytes()),
            0);
  for (int e = 0; e < 2; ++e) {
    const Tensor& w1 = e == 0 ? ffn_w1 : e1_w1;
    const Tensor& w2 = e == 0 ? ffn_w2 : e1_w2;
    for (int s = 0; s < 2; ++s) {
      const std::string shard =
          "L0.E" + std::to_string(e) + ".S" + std::to_string(s);
      const Tensor& sw1 = got[shard]["w1"];  // (8, 8): columns s*8 .. +8
      const Tensor& sw2 = got[shard]["w2"];  // (8, 8): rows s*8 .. +8
      for (int r = 0; r < 8; ++r) {
        for (int c = 0; c < 8; ++c) {
          ASSERT_EQ(sw1.f32()[r * 8 + c], w1.f32()[r * 16 + s * 8 + c])
              << shard << " w1";
          ASSERT_EQ(sw2.f32()[r * 8 + c], w2.f32()[(s * 8 + r) * 8 + c])
              << shard << " w2";
        }
      }
      if (e == 0) {  // Upcycled: the FFN's biases too.
        EXPECT_EQ(got[shard]["b1"].f32()[0], ffn_b1.f32()[s * 8]);
        if (s == 0) {
          EXPECT_EQ(got[shard]["b2"].f32()[3], ffn_b2.f32()[3]);
        }
      }
    }
  }
  worker.Shutdown();
  // A tensor of the wrong shape is refused, naming it.
  ASSERT_TRUE(storage::WriteSafetensors(
                  path, {{"layers.1.ffn.w1", random({8, 15})}}, {})
                  .ok());
  WorkerService wrong(config, "w");
  ASSERT_TRUE(wrong.Start().ok());
  Status s = wrong.ApplyRouting(Routing(kEpoch));
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("layers.1.ffn.w1"), std::string::npos)
      << s.message();
  wrong.Shutdown();
  std::filesystem::remove(path);
}

TEST(WorkerServiceTest, DenseInitDoesNotDependOnSharding) {
  std::vector<float> flat[2];
  const int shardings[2] = {1, 3};
  for (int i = 0; i < 2; ++i) {
    WorkerService worker(TestConfig("adamw", shardings[i]), "w");
    ASSERT_TRUE(worker.Start().ok());
    ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch, shardings[i])).ok());
    for (int d = 0; d < shardings[i]; ++d) {
      Message r = Ask(&worker, DenseRequest(MessageKind::kDensePull, 0, 0, d));
      ASSERT_EQ(r.header.status_code, 0) << r.error_text;
      flat[i].insert(flat[i].end(), r.payload.f32(),
                     r.payload.f32() + r.payload.num_elements());
    }
  }
  ASSERT_EQ(flat[0].size(), flat[1].size());
  EXPECT_EQ(flat[0], flat[1]);
  // Norm scales start at one, embeddings are small random values.
  for (const DenseTensor& t : DenseLayout(TestConfig("adamw").model())) {
    if (t.name == "layers.0.norm1.scale") {
      EXPECT_EQ(flat[0][t.offset], 1.0f);
    }
    if (t.name == "tok_embed") {
      EXPECT_NE(flat[0][t.offset], 0.0f);
      EXPECT_LT(std::abs(flat[0][t.offset]), 0.2f);
    }
  }
}

TEST(WorkerServiceTest, DenseUpdateSumsPushesInRankOrder) {
  auto config = TestConfig("adamw");
  WorkerService worker(config, "w");
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  Message before = Ask(&worker, DenseRequest(MessageKind::kDensePull, 0, 0, 1));
  // Rank 1 pushes first; the sum is still rank 0 + rank 1.
  Message g1 = DenseRequest(MessageKind::kDensePush, 0, 1, 1);
  Message g0 = DenseRequest(MessageKind::kDensePush, 0, 0, 1);
  Tensor sum = g0.payload.Clone();
  for (int64_t i = 0; i < sum.num_elements(); ++i) {
    sum.f32()[i] += g1.payload.f32()[i];
  }
  EXPECT_EQ(Ask(&worker, std::move(g1)).header.status_code, 0);
  EXPECT_EQ(Ask(&worker, std::move(g0)).header.status_code, 0);
  for (int r = 0; r < kRanks; ++r) {
    Ask(&worker, Request(MessageKind::kStepDone, 0, r, 0, 0, 0));
  }
  Message after = Ask(&worker, DenseRequest(MessageKind::kDensePull, 1, 0, 1));
  ASSERT_EQ(after.header.status_code, 0) << after.error_text;
  auto optimizer = Optimizer::Create(config.training()).value();
  Tensor expected = before.payload.Clone();
  OptimizerState state = optimizer->NewState(expected).value();
  ASSERT_TRUE(optimizer->Apply(0, sum, &expected, &state).ok());
  ASSERT_EQ(after.payload.num_bytes(), expected.num_bytes());
  EXPECT_EQ(
      std::memcmp(after.payload.data(), expected.data(), expected.num_bytes()),
      0);
}

TEST(WorkerServiceTest, DenseRefusals) {
  WorkerService worker(TestConfig("adamw"), "w");
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  Message unknown =
      Ask(&worker, DenseRequest(MessageKind::kDensePull, 0, 0, 9));
  EXPECT_EQ(unknown.header.status_code,
            static_cast<int32_t>(StatusCode::kNotFound));
  Message wrong = DenseRequest(MessageKind::kDensePush, 0, 0, 0);
  wrong.payload = Tensor::Zeros(DType::kF32, {1, 3}).value();
  Message r = Ask(&worker, std::move(wrong));
  EXPECT_NE(r.error_text.find("must be fp32[1,"), std::string::npos)
      << "[" << r.error_text << "] " << r.header.status_code;
  EXPECT_EQ(Ask(&worker, DenseRequest(MessageKind::kDensePush, 0, 0, 0))
                .header.status_code,
            0);
  Message dup = Ask(&worker, DenseRequest(MessageKind::kDensePush, 0, 0, 0));
  EXPECT_EQ(dup.header.status_code,
            static_cast<int32_t>(StatusCode::kAlreadyExists));
}

TEST(WorkerServiceTest, ExposesComputeAndQueueMetrics) {
  auto& registry = MetricsRegistry::Global();
  const uint64_t requests_before =
      registry.GetCounter("switchyard_worker_requests_total")->value();
  const uint64_t refused_before =
      registry.GetCounter("switchyard_worker_refused_total")->value();
  const uint64_t tokens_before =
      registry.GetCounter("switchyard_worker_tokens_total")->value();
  WorkerService worker(TestConfig("adamw"), "w");
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  Ask(&worker, Request(MessageKind::kExpertForward, 0, 0, 0, 0, 0, kEpoch, 5));
  Ask(&worker, Request(MessageKind::kExpertForward, 0, 0, 0, 9, 0, kEpoch, 2));
  EXPECT_EQ(registry.GetCounter("switchyard_worker_requests_total")->value(),
            requests_before + 2);
  EXPECT_EQ(registry.GetCounter("switchyard_worker_refused_total")->value(),
            refused_before + 1);
  EXPECT_EQ(registry.GetCounter("switchyard_worker_tokens_total")->value(),
            tokens_before + 7);
  const std::string text = registry.RenderText();
  EXPECT_NE(text.find("switchyard_worker_request_ms_count"), std::string::npos);
  EXPECT_NE(text.find("switchyard_worker_queue_depth"), std::string::npos);
}

TEST(WorkerServiceTest, HandleNeverWaitsForComputation) {
  // A large shard, so one forward takes a while.
  auto loaded = ParseConfig(
      "", "big",
      {"cluster.trainers=2", "model.num_layers=2", "model.moe_every=2",
       "model.num_experts=1", "model.d_model=1024", "model.d_ff=4096",
       "model.num_heads=8", "model.seq_len=16", "model.vocab_size=32",
       "model.dense_shards=1"});
  ASSERT_TRUE(loaded.ok());
  WorkerService worker(loaded->config, "w");
  ASSERT_TRUE(worker.Start().ok());
  control::RoutingTable routing;
  routing.set_epoch(kEpoch);
  routing.add_workers()->set_name("w");
  auto* entry = routing.add_entries();
  entry->mutable_shard()->set_kind(control::EXPERT);
  entry->set_worker(0);
  ASSERT_TRUE(worker.ApplyRouting(routing).ok());
  auto forward = [](int rank, int tokens) {
    Message m;
    m.header.kind = static_cast<uint8_t>(MessageKind::kExpertForward);
    m.header.epoch = kEpoch;
    m.header.trainer_rank = rank;
    m.payload = Tensor::Zeros(DType::kF32, {tokens, 1024}).value();
    m.header.dtype = static_cast<uint8_t>(DType::kF32);
    m.header.rows = tokens;
    m.header.cols = 1024;
    m.header.payload_bytes = m.payload.num_bytes();
    return m;
  };
  Replies replies;
  const auto heavy_start = std::chrono::steady_clock::now();
  worker.Handle(forward(0, 4096), replies.Make());
  std::this_thread::sleep_for(Ms(5));  // The compute thread is in the GEMM.
  const auto start = std::chrono::steady_clock::now();
  worker.Handle(forward(1, 1), replies.Make());
  const auto handle_time = std::chrono::steady_clock::now() - start;
  EXPECT_TRUE(replies.Wait().empty());
  const auto heavy_time = std::chrono::steady_clock::now() - heavy_start;
  // Queueing takes microseconds; the computation takes far longer.
  EXPECT_LT(handle_time * 10, heavy_time)
      << "Handle() took "
      << std::chrono::duration_cast<std::chrono::microseconds>(handle_time)
             .count()
      << " us while the forward took "
      << std::chrono::duration_cast<Ms>(heavy_time).count() << " ms";
}

TEST(WorkerServiceTest, ZeroTokenRequestsAreNormal) {
  WorkerService worker(TestConfig("adamw"), "w");
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  const std::string before = worker.ParameterDigest();
  Replies replies;
  worker.Handle(Request(MessageKind::kExpertForward, 0, 0, 0, 1, 1, kEpoch, 0),
                replies.Make());
  worker.Handle(Request(MessageKind::kExpertBackward, 0, 0, 0, 1, 1, kEpoch, 0),
                replies.Make());
  for (int r = 0; r < kRanks; ++r) {
    worker.Handle(Request(MessageKind::kStepDone, 0, r, 0, 0, 0),
                  replies.Make());
  }
  EXPECT_TRUE(replies.Wait().empty());
  EXPECT_EQ(worker.next_step(), 1);
  EXPECT_EQ(worker.ParameterDigest(), before);  // No tokens: no update.
}

TEST(WorkerServiceTest, OverUcxMatchesInProcess) {
  const std::string reference = RunInterleaved("adamw", 0);
  WorkerService worker(TestConfig("adamw"), "w");
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  auto server =
      transport::NewUcxDataPlane(transport::DataPlaneOptions()).value();
  ASSERT_TRUE(server
                  ->Start([&worker](Message m, transport::Reply reply) {
                    worker.Handle(std::move(m), std::move(reply));
                  })
                  .ok());
  std::vector<std::thread> trainers;
  std::atomic<int> failures{0};
  for (int r = 0; r < kRanks; ++r) {
    trainers.emplace_back([&, r] {
      auto client =
          transport::NewUcxDataPlane(transport::DataPlaneOptions()).value();
      if (!client->Start(nullptr).ok()) {
        ++failures;
        return;
      }
      for (int step = 0; step < kSteps; ++step) {
        for (auto& m : TrainerStep(step, r)) {
          auto reply =
              client->SendSync(server->address(), std::move(m), Ms(30000));
          if (!reply.ok()) {
            ADD_FAILURE() << reply.status().ToString();
            ++failures;
          }
        }
      }
      client->Shutdown();
    });
  }
  for (auto& t : trainers) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(worker.ParameterDigest(), reference);
  server->Shutdown();
}

}  // namespace
}  // namespace switchyard::expert_worker
