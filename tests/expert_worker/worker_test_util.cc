// The helpers of worker_test_util.h.
#include "tests/expert_worker/worker_test_util.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <filesystem>
#include <future>
#include <memory>
#include <random>
#include <set>
#include <thread>
#include <tuple>
#include <utility>

#include "common/config.h"
#include "common/metrics.h"
#include "common/model_shape.h"
#include "common/random.h"
#include "common/shard_ref.h"

namespace switchyard::expert_worker::worker_testing {
namespace {

// Tokens that (step, rank, mb) routes to expert e: sometimes none.
int Tokens(int step, int rank, int mb, int expert) {
  return static_cast<int>(
      RandomBits(9,
                 {static_cast<uint64_t>(step), static_cast<uint64_t>(rank),
                  static_cast<uint64_t>(mb), static_cast<uint64_t>(expert)}) %
      6);
}

int64_t DenseCount(int shard) {
  return DenseShardRange(TestConfig("adamw").model(), shard).count;
}

}  // namespace

config::SwitchyardConfig TestConfig(const std::string& optimizer,
                                    int dense_shards,
                                    const std::string& dtype) {
  auto loaded = ParseConfig(
      "", "test",
      {"cluster.trainers=2", "model.num_layers=2", "model.moe_every=2",
       "model.num_experts=2", "model.shards_per_expert=2", "model.d_model=8",
       "model.d_ff=16", "model.num_heads=2", "model.seq_len=16",
       "model.vocab_size=32", "training.threads=1",
       "training.micro_batches=" + std::to_string(kMicroBatches),
       "training.optimizer=" + optimizer, "training.warmup_steps=0",
       "model.dense_shards=" + std::to_string(dense_shards),
       "training.compute_dtype=" + dtype});
  CHECK(loaded.ok()) << loaded.status().ToString();
  return loaded->config;
}

control::RoutingTable Routing(uint64_t epoch, int dense_shards) {
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

Message Request(MessageKind kind, int step, int rank, int mb, int expert,
                int shard, uint64_t epoch, int tokens) {
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

Message DenseRequest(MessageKind kind, int step, int rank, int shard,
                     uint64_t epoch) {
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

transport::Reply Replies::Make() {
  {
    MutexLock lock(&state_->mu);
    ++state_->expected;
  }
  return [state = state_](Message r) {
    {
      MutexLock lock(&state->mu);
      if (r.header.status_code != 0) state->errors.push_back(r.error_text);
      ++state->received;
    }
    state->cv.NotifyAll();
  };
}

std::vector<std::string> Replies::Wait() {
  State& s = *state_;
  MutexLock lock(&s.mu);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (s.received != s.expected) {
    if (!s.cv.WaitUntil(&s.mu, deadline)) break;
  }
  EXPECT_EQ(s.received, s.expected) << "replies still missing after 30 s";
  return s.errors;
}

std::string RunInterleaved(const std::string& optimizer, uint32_t seed,
                           const std::string& dtype) {
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
  // Forwards sent, by rank: a trainer sends a backward only once its
  // forward was answered, i.e. once every rank's forward came.
  using Key = std::tuple<int64_t, int32_t, int32_t, int32_t>;
  std::vector<std::set<Key>> forwarded(kRanks);
  auto key = [](const Message& m) {
    return Key{m.header.step, m.header.micro_batch, m.header.expert,
               m.header.shard};
  };
  auto eligible = [&](int r) {
    if (streams[r].empty() || streams[r].front().header.step > done[1 - r]) {
      return false;
    }
    const Message& m = streams[r].front();
    return m.header.kind !=
               static_cast<uint8_t>(MessageKind::kExpertBackward) ||
           forwarded[1 - r].count(key(m)) > 0;
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
    if (m.header.kind == static_cast<uint8_t>(MessageKind::kExpertForward))
      forwarded[r].insert(key(m));
    worker.Handle(std::move(m), replies.Make());
  }
  const std::vector<std::string> errors = replies.Wait();
  EXPECT_TRUE(errors.empty()) << errors.front();
  EXPECT_EQ(worker.next_step(), kSteps);
  return worker.ParameterDigest();
}

Message Ask(WorkerService* worker, Message m) {
  std::vector<std::vector<Message>> one(1);
  one[0].push_back(std::move(m));
  return std::move(AskTogether(worker, std::move(one))[0][0]);
}

std::vector<std::vector<Message>> AskTogether(
    WorkerService* worker, std::vector<std::vector<Message>> per_rank) {
  std::vector<std::vector<Addressed>> addressed(per_rank.size());
  for (size_t r = 0; r < per_rank.size(); ++r) {
    for (Message& m : per_rank[r])
      addressed[r].emplace_back(worker, std::move(m));
  }
  return AskTogether(std::move(addressed));
}

std::vector<std::vector<Message>> AskTogether(
    std::vector<std::vector<Addressed>> per_rank) {
  std::vector<std::vector<Message>> answers(per_rank.size());
  size_t longest = 0;
  for (const auto& list : per_rank) longest = std::max(longest, list.size());
  for (size_t i = 0; i < longest; ++i) {
    std::vector<std::pair<size_t, std::future<Message>>> waiting;
    for (size_t r = 0; r < per_rank.size(); ++r) {
      if (i >= per_rank[r].size()) continue;
      auto p = std::make_shared<std::promise<Message>>();
      waiting.emplace_back(r, p->get_future());
      auto& [worker, m] = per_rank[r][i];
      worker->Handle(std::move(m),
                     [p](Message answer) { p->set_value(std::move(answer)); });
    }
    for (auto& [r, f] : waiting) {
      if (f.wait_for(Ms(10000)) != std::future_status::ready) {
        ADD_FAILURE() << "rank " << r << " request " << i
                      << " unanswered after 10 s";
        Message none;
        none.header.status_code = 1;
        none.error_text = "unanswered";
        answers[r].push_back(std::move(none));
        continue;
      }
      answers[r].push_back(f.get());
    }
  }
  return answers;
}

void StepTogether(WorkerService* worker, int step, uint64_t epoch) {
  std::vector<std::vector<Message>> per_rank;
  for (int r = 0; r < kRanks; ++r) {
    per_rank.push_back(TrainerStep(step, r));
    for (Message& m : per_rank.back()) m.header.epoch = epoch;
  }
  for (const auto& answers : AskTogether(worker, std::move(per_rank))) {
    for (const Message& a : answers) {
      EXPECT_EQ(a.header.status_code, 0) << a.error_text;
    }
  }
}

std::string FreshDir(const std::string& tag) {
  const std::string dir = ::testing::TempDir() + "/switchyard_ws_" + tag + "_" +
                          std::to_string(::getpid());
  std::filesystem::remove_all(dir);
  return dir;
}

uint64_t CounterValue(const std::string& name) {
  return MetricsRegistry::Global().GetCounter(name)->value();
}

void TrainSteps(WorkerService* worker, int first, int end,
                const std::function<void(int)>& after_step) {
  for (int step = first; step < end; ++step) {
    StepTogether(worker, step);
    after_step(step);
  }
}

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

std::map<int64_t, DigestsByShard> Reported::Get() {
  std::lock_guard<std::mutex> lock(mu);
  return digests;
}

WorkerService::CheckpointReporter Reported::Reporter() {
  return [this](const control::CheckpointReport& r) {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& shard : r.shards()) {
      digests[r.step()][FromShardRef(shard.shard()).ToString()] =
          shard.digest();
    }
    return OkStatus();
  };
}

void ExpectEachMatches(const std::map<int64_t, DigestsByShard>& reported,
                       const std::vector<DigestsByShard>& expected) {
  for (const auto& [step, digests] : reported) {
    EXPECT_EQ(digests, expected[step]) << "checkpoint " << step;
  }
}

StatusOr<checkpoint::ShardManifest> FullDiskStore::WriteShard(
    const storage::ShardSnapshot& s) {
  if (full) return ResourceExhaustedError("No space left on device");
  return inner_->WriteShard(s);
}

StatusOr<storage::ShardSnapshot> FullDiskStore::ReadShard(
    int64_t step, const std::string& shard) {
  return inner_->ReadShard(step, shard);
}

Status FullDiskStore::ReadShardInto(int64_t step, const std::string& shard,
                                    storage::ShardSnapshot* into) {
  return inner_->ReadShardInto(step, shard, into);
}

StatusOr<std::vector<checkpoint::ShardManifest>> FullDiskStore::Manifests(
    std::optional<int64_t> step) {
  return inner_->Manifests(step);
}

Status FullDiskStore::DropSteps(int64_t first, int64_t end) {
  return inner_->DropSteps(first, end);
}

Status FullDiskStore::VerifyFiles() { return inner_->VerifyFiles(); }

Status GatedReadStore::ReadShardInto(int64_t step, const std::string& shard,
                                     storage::ShardSnapshot* into) {
  ++waiting;
  const auto deadline = std::chrono::steady_clock::now() + Ms(30000);
  while (!open && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(5));
  }
  return FullDiskStore::ReadShardInto(step, shard, into);
}

StatusOr<checkpoint::ShardManifest> GatedWriteStore::WriteShard(
    const storage::ShardSnapshot& s) {
  ++writing;
  const auto deadline = std::chrono::steady_clock::now() + Ms(30000);
  while (!open && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(5));
  }
  return FullDiskStore::WriteShard(s);
}

bool GatedWriteStore::WaitForAWrite() const {
  const auto deadline = std::chrono::steady_clock::now() + Ms(30000);
  while (writing == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(5));
  }
  return writing > 0;
}

}  // namespace switchyard::expert_worker::worker_testing
