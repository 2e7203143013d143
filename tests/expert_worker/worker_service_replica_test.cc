// Hot-expert replication inside a worker (WorkerService): while a
// replicated shard's chunk computes on its copy elsewhere, the worker
// serves the other shards' requests; what the copy fails to give it
// computes itself, with the bits a worker without copies gets; a backward
// of a forward not answered yet is refused.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <future>
#include <memory>
#include <vector>

#include "tests/expert_worker/worker_test_util.h"
#include "tests/testing/data_plane_options.h"

namespace switchyard::expert_worker::worker_testing {
namespace {

// TestConfig whose expert shards with 5x the mean expert's tokens get two
// replicas, decided after every step. The mean expert shard's tokens per
// step: 2 trainers x 1 sequence x 16 tokens / 2 experts = 16.
config::SwitchyardConfig ReplicatingConfig(bool enabled) {
  config::SwitchyardConfig c = TestConfig("adamw");
  c.mutable_training()->set_batch_size(1);
  auto* r = c.mutable_replication();
  r->set_enabled(enabled);
  r->set_window_steps(1);
  r->set_max_replicas(2);
  return c;
}

// Another worker's data plane, hosting copies as a test wants: it takes
// weights and drops, holds every chunk forward until Release, then refuses
// them (so the primary computes them itself).
class HoldingCopyHost {
 public:
  HoldingCopyHost()
      : plane_(transport::NewUcxDataPlane(testing::TestDataPlaneOptions())
                   .value()) {
    const Status started = plane_->Start([this](Message m,
                                                transport::Reply reply) {
      if (m.header.kind != static_cast<uint8_t>(MessageKind::kReplicaForward)) {
        reply(transport::TensorResponse(m.header, Tensor()));
        return;
      }
      MutexLock lock(&mu_);
      held_.push_back({std::move(m), std::move(reply)});
      cv_.NotifyAll();
    });
    CHECK(started.ok()) << started.ToString();
  }
  ~HoldingCopyHost() {
    Release();
    plane_->Shutdown();
  }

  std::string address() const { return plane_->address(); }

  // Whether a chunk forward is held within 10 s.
  bool WaitHolding() {
    const auto deadline = std::chrono::steady_clock::now() + Ms(10000);
    MutexLock lock(&mu_);
    while (held_.empty()) {
      if (!cv_.WaitUntil(&mu_, deadline)) return !held_.empty();
    }
    return true;
  }

  void Release() {
    std::vector<std::pair<Message, transport::Reply>> held;
    {
      MutexLock lock(&mu_);
      held.swap(held_);
    }
    for (auto& [m, reply] : held) {
      reply(transport::ErrorResponse(
          m.header, UnavailableError("the test let the copy go")));
    }
  }

 private:
  std::unique_ptr<transport::DataPlane> plane_;
  Mutex mu_;
  CondVar cv_;
  std::vector<std::pair<Message, transport::Reply>> held_ GUARDED_BY(mu_);
};

// Step 0 of every shard, both ranks: expert 0 with 20 rows per rank and
// micro-batch (80 per step: 5x the mean, so two replicas from step 1),
// expert 1 with 1.
void HotStepZero(WorkerService* worker) {
  std::vector<std::vector<Message>> per_rank(kRanks);
  for (int rank = 0; rank < kRanks; ++rank) {
    for (MessageKind kind :
         {MessageKind::kExpertForward, MessageKind::kExpertBackward}) {
      for (int mb = 0; mb < kMicroBatches; ++mb) {
        for (int e = 0; e < 2; ++e) {
          for (int s = 0; s < 2; ++s) {
            per_rank[rank].push_back(
                Request(kind, 0, rank, mb, e, s, kEpoch, e == 0 ? 20 : 1));
          }
        }
      }
    }
    per_rank[rank].push_back(
        Request(MessageKind::kStepDone, 0, rank, 0, 0, 0, kEpoch));
  }
  for (const auto& answers : AskTogether(worker, std::move(per_rank))) {
    for (const Message& m : answers) {
      ASSERT_EQ(m.header.status_code, 0) << m.error_text;
    }
  }
}

// Step 1's forward of expert `expert`, shard 0, micro-batch 0, both ranks,
// sent without waiting: the answers' futures.
std::vector<std::future<Message>> SendForwards(WorkerService* worker,
                                               int expert) {
  std::vector<std::future<Message>> answers;
  for (int rank = 0; rank < kRanks; ++rank) {
    auto promise = std::make_shared<std::promise<Message>>();
    answers.push_back(promise->get_future());
    worker->Handle(Request(MessageKind::kExpertForward, 1, rank, 0, expert, 0,
                           kEpoch, expert == 0 ? 20 : 1),
                   [promise](Message m) { promise->set_value(std::move(m)); });
  }
  return answers;
}

bool SameBits(const Message& a, const Message& b) {
  return a.header.status_code == 0 && b.header.status_code == 0 &&
         a.payload.num_bytes() == b.payload.num_bytes() &&
         std::memcmp(a.payload.data(), b.payload.data(),
                     a.payload.num_bytes()) == 0;
}

TEST(WorkerServiceReplicaTest, ServesOtherShardsWhileACopyComputes) {
  HoldingCopyHost copy;
  auto peers =
      transport::NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
  ASSERT_TRUE(peers->Start(transport::RefuseRequests("w")).ok());
  control::RoutingTable routing = Routing(kEpoch);
  routing.mutable_workers(0)->set_confirmed(true);
  routing.mutable_workers(0)->set_data_address(peers->address());
  auto* other = routing.add_workers();
  other->set_name("w1");
  other->set_confirmed(true);
  other->set_data_address(copy.address());
  // The same requests to a worker with copies and to one without.
  WorkerService worker(ReplicatingConfig(true), "w");
  WorkerService plain(ReplicatingConfig(false), "w");
  for (WorkerService* w : {&worker, &plain}) {
    ASSERT_TRUE(w->Start().ok());
    w->SetPeerPlane(peers.get());
    ASSERT_TRUE(w->ApplyRouting(routing).ok());
    HotStepZero(w);
  }

  // Expert 0's chunk 1 goes to its copy, which holds it.
  std::vector<std::future<Message>> hot = SendForwards(&worker, 0);
  ASSERT_TRUE(copy.WaitHolding());
  // Meanwhile expert 1's forward is answered.
  std::vector<std::future<Message>> cold = SendForwards(&worker, 1);
  for (auto& answer : cold) {
    ASSERT_EQ(answer.wait_for(Ms(10000)), std::future_status::ready);
  }
  for (auto& answer : hot) {
    EXPECT_EQ(answer.wait_for(Ms(0)), std::future_status::timeout)
        << "expert 0 was answered before its copy was";
  }
  // A backward of the unanswered forward is refused (a trainer never sends
  // one; its rows of h from the copy are not here yet).
  for (int rank = 0; rank < kRanks; ++rank) {
    const Message refused = Ask(&worker, Request(MessageKind::kExpertBackward,
                                                 1, rank, 0, 0, 0, kEpoch, 20));
    EXPECT_EQ(refused.header.status_code,
              static_cast<int32_t>(StatusCode::kFailedPrecondition))
        << refused.error_text;
  }
  // The copy refuses: the worker computes the chunk itself.
  copy.Release();
  std::vector<std::future<Message>> plain_hot = SendForwards(&plain, 0);
  std::vector<std::future<Message>> plain_cold = SendForwards(&plain, 1);
  for (int rank = 0; rank < kRanks; ++rank) {
    ASSERT_EQ(hot[rank].wait_for(Ms(10000)), std::future_status::ready);
    const Message got_hot = hot[rank].get(), want_hot = plain_hot[rank].get();
    EXPECT_EQ(got_hot.payload.dim(0), 20);
    EXPECT_TRUE(SameBits(got_hot, want_hot)) << "rank " << rank;
    EXPECT_TRUE(SameBits(cold[rank].get(), plain_cold[rank].get()))
        << "rank " << rank;
  }
  worker.Shutdown();
  plain.Shutdown();
  peers->Shutdown();
}

}  // namespace
}  // namespace switchyard::expert_worker::worker_testing
