// The worker's step protocol: the same requests in different arrival orders
// and thread interleavings give bit-identical parameters, and every invalid
// request is refused with its reason while the worker keeps serving. Also
// its metrics, a Handle() that never waits for computation, and the same
// result over UCX. The helpers are in worker_test_util.h.
#include "expert_worker/worker_service.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/config.h"
#include "common/metrics.h"
#include "tests/expert_worker/worker_test_util.h"
#include "tests/testing/data_plane_options.h"

namespace switchyard::expert_worker::worker_testing {
namespace {

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
          // Like a trainer: the requests of a phase (a run of one kind)
          // go at once, and their answers come before the next phase's
          // (a backward follows its forward's answer; the next step, the
          // StepDone's).
          std::vector<Message> step_requests = TrainerStep(step, r);
          for (size_t i = 0; i < step_requests.size();) {
            Replies replies;
            const uint8_t kind = step_requests[i].header.kind;
            for (; i < step_requests.size() &&
                   step_requests[i].header.kind == kind;
                 ++i) {
              worker.Handle(std::move(step_requests[i]), replies.Make());
              if (rng() % 3 == 0) std::this_thread::yield();
            }
            EXPECT_TRUE(replies.Wait().empty());
          }
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

// A hold (a trainer died) stops the step in flight but keeps its
// gradients; the epoch that continues from the step after it applies that
// update from them (every trainer had finished the step: some workers
// applied it), and one that continues from the step itself drops them to
// have it redone. Either way the parameters end as if nothing happened.
TEST(WorkerServiceTest, AHoldKeepsTheStepAndTheNextEpochAppliesOrDropsIt) {
  const config::SwitchyardConfig config = TestConfig("adamw");
  const std::vector<DigestsByShard> want = DigestsByStep(config, 3);
  // Step 1 with every request but rank 1's StepDone.
  const auto partial_step = [](WorkerService* worker) {
    std::vector<std::vector<Message>> per_rank;
    for (int r = 0; r < kRanks; ++r) per_rank.push_back(TrainerStep(1, r));
    per_rank[1].pop_back();  // Its StepDone.
    for (const auto& answers : AskTogether(worker, std::move(per_rank))) {
      for (const Message& a : answers) {
        EXPECT_EQ(a.header.status_code, 0) << a.error_text;
      }
    }
  };
  const auto table = [](uint64_t epoch, bool hold, int64_t resume) {
    control::RoutingTable t = Routing(epoch);
    t.set_hold(hold);
    t.set_continues(!hold);
    t.set_resume_step(resume);
    return t;
  };
  const auto finish = [&](WorkerService* worker, int first, uint64_t epoch) {
    for (int step = first; step < 3; ++step) StepTogether(worker, step, epoch);
  };
  for (const int64_t resume : {2, 1}) {
    SCOPED_TRACE("continues from step " + std::to_string(resume));
    WorkerService worker(config, "w");
    ASSERT_TRUE(worker.Start().ok());
    ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
    TrainSteps(&worker, 0, 1);
    partial_step(&worker);
    EXPECT_FALSE(worker.held().has_value());
    ASSERT_TRUE(worker.ApplyRouting(table(kEpoch + 1, true, 0)).ok());
    const auto held = worker.held();
    ASSERT_TRUE(held.has_value());
    EXPECT_EQ(held->epoch, kEpoch + 1);
    EXPECT_EQ(held->step, 1);
    EXPECT_TRUE(held->serving);
    // Nothing is served in a hold, of either epoch.
    Message stale = Request(MessageKind::kStepDone, 1, 1, 0, 0, 0);
    EXPECT_EQ(Ask(&worker, std::move(stale)).header.status_code,
              static_cast<uint8_t>(StatusCode::kFailedPrecondition));
    Message early = Request(MessageKind::kStepDone, 1, 1, 0, 0, 0, kEpoch + 1);
    EXPECT_EQ(Ask(&worker, std::move(early)).header.status_code,
              static_cast<uint8_t>(StatusCode::kAborted));
    EXPECT_EQ(worker.ShardDigests(), want[1]);
    ASSERT_TRUE(worker.ApplyRouting(table(kEpoch + 2, false, resume)).ok());
    EXPECT_FALSE(worker.held().has_value());
    EXPECT_EQ(worker.next_step(), resume);
    EXPECT_EQ(worker.ShardDigests(), want[resume]);
    finish(&worker, static_cast<int>(resume), kEpoch + 2);
    EXPECT_EQ(worker.ShardDigests(), want[3]);
  }
  // A worker that missed the epoch before a hold (the others adopted a
  // rollback it never saw) does not count as serving: the coordinator then
  // rolls back rather than continue from its step.
  WorkerService worker(config, "w");
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  TrainSteps(&worker, 0, 1);
  ASSERT_TRUE(worker.ApplyRouting(table(kEpoch + 2, true, 0)).ok());
  ASSERT_TRUE(worker.held().has_value());
  EXPECT_FALSE(worker.held()->serving);
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
  cases.push_back(
      {"micro-batch beyond training.micro_batches",
       Request(MessageKind::kExpertForward, 0, 0, kMicroBatches, 0, 0),
       StatusCode::kInvalidArgument,
       "micro-batch 2 is outside [0, training.micro_batches = 2)"});
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
  // A forward waits for every rank's: a second one of a rank is refused
  // while it waits, and after.
  Replies first;
  worker.Handle(Request(MessageKind::kExpertForward, 0, 0, 0, 0, 0, kEpoch, 3),
                first.Make());
  Message waiting_dup =
      send(Request(MessageKind::kExpertForward, 0, 0, 0, 0, 0, kEpoch, 3));
  EXPECT_EQ(waiting_dup.header.status_code,
            static_cast<int32_t>(StatusCode::kAlreadyExists))
      << waiting_dup.error_text;
  Message fwd =
      send(Request(MessageKind::kExpertForward, 0, 1, 0, 0, 0, kEpoch, 2));
  EXPECT_EQ(fwd.header.status_code, 0) << fwd.error_text;
  EXPECT_EQ(fwd.payload.dim(0), 2);
  EXPECT_TRUE(first.Wait().empty());
  Message dup =
      send(Request(MessageKind::kExpertForward, 0, 0, 0, 0, 0, kEpoch, 3));
  EXPECT_EQ(dup.header.status_code,
            static_cast<int32_t>(StatusCode::kAlreadyExists));
  // An evaluation must carry rows (training requests may carry none).
  Message eval = Request(MessageKind::kExpertEval, 0, 0, 0, 0, 0, kEpoch, 1);
  eval.payload = Tensor();
  Message no_rows = send(std::move(eval));
  EXPECT_EQ(no_rows.header.status_code,
            static_cast<int32_t>(StatusCode::kInvalidArgument));
  EXPECT_NE(no_rows.error_text.find("payload <none>"), std::string::npos)
      << no_rows.error_text;
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
  // A probe is answered whatever its epoch, step or rank: it asks only
  // whether the worker's serving thread runs.
  for (uint64_t epoch : {kEpoch - 1, kEpoch, kEpoch + 1}) {
    Message probe = Request(MessageKind::kProbe, 5, 9, 0, 0, 0, epoch, 0);
    probe.payload = Tensor();
    probe.header.dtype = transport::kNoDType;
    probe.header.rows = probe.header.cols = 0;
    probe.header.payload_bytes = 0;
    Message answer = send(std::move(probe));
    EXPECT_EQ(answer.header.status_code, 0)
        << epoch << ": " << answer.error_text;
    EXPECT_TRUE(answer.payload.empty()) << epoch;
  }
  EXPECT_EQ(worker.next_step(), 1);
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
  std::vector<std::vector<Message>> both(kRanks);
  both[0].push_back(
      Request(MessageKind::kExpertForward, 0, 0, 0, 0, 0, kEpoch, 5));
  both[1].push_back(
      Request(MessageKind::kExpertForward, 0, 1, 0, 0, 0, kEpoch, 0));
  for (const auto& answers : AskTogether(&worker, std::move(both))) {
    EXPECT_EQ(answers.front().header.status_code, 0);
  }
  Ask(&worker, Request(MessageKind::kExpertForward, 0, 0, 0, 9, 0, kEpoch, 2));
  EXPECT_EQ(registry.GetCounter("switchyard_worker_requests_total")->value(),
            requests_before + 3);
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
       "model.dense_shards=1", "training.micro_batches=2"});
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
  auto forward = [](int rank, int micro_batch, int tokens) {
    Message m;
    m.header.kind = static_cast<uint8_t>(MessageKind::kExpertForward);
    m.header.epoch = kEpoch;
    m.header.trainer_rank = rank;
    m.header.micro_batch = micro_batch;
    m.payload = Tensor::Zeros(DType::kF32, {tokens, 1024}).value();
    m.header.dtype = static_cast<uint8_t>(DType::kF32);
    m.header.rows = tokens;
    m.header.cols = 1024;
    m.header.payload_bytes = m.payload.num_bytes();
    return m;
  };
  Replies replies;
  const auto heavy_start = std::chrono::steady_clock::now();
  worker.Handle(forward(0, 0, 2048), replies.Make());
  worker.Handle(forward(1, 0, 2048), replies.Make());
  std::this_thread::sleep_for(Ms(5));  // The compute thread is in the GEMM.
  const auto start = std::chrono::steady_clock::now();
  worker.Handle(forward(0, 1, 1), replies.Make());
  const auto handle_time = std::chrono::steady_clock::now() - start;
  // Nor do a heartbeat's reads (a lease must not expire behind a GEMM).
  const auto loads_start = std::chrono::steady_clock::now();
  const std::vector<control::ShardLoad> loads = worker.TakeLoads();
  EXPECT_FALSE(worker.held().has_value());
  const auto loads_time = std::chrono::steady_clock::now() - loads_start;
  ASSERT_EQ(loads.size(), 1u);
  worker.Handle(forward(1, 1, 1), replies.Make());
  EXPECT_TRUE(replies.Wait().empty());
  const auto heavy_time = std::chrono::steady_clock::now() - heavy_start;
  // Queueing takes microseconds; the computation takes far longer.
  EXPECT_LT(loads_time * 10, heavy_time);
  // The forward's tokens are counted once it ran: 2048 from each rank,
  // and 1 from each in the second micro-batch.
  const std::vector<control::ShardLoad> counted = worker.TakeLoads();
  ASSERT_EQ(counted.size(), 1u);
  EXPECT_EQ(counted[0].tokens(), loads[0].tokens() == 0 ? 4098u : 2u);
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
  // Rank 0 sends (0, d_model) payloads, rank 1 none at all: both mean no
  // rows, and are answered without any.
  std::vector<std::vector<Message>> per_rank(kRanks);
  for (int r = 0; r < kRanks; ++r) {
    for (MessageKind kind :
         {MessageKind::kExpertForward, MessageKind::kExpertBackward}) {
      Message m = Request(kind, 0, r, 0, 1, 1, kEpoch, 0);
      if (r == 1) m = transport::TensorMessage(m.header, Tensor());
      per_rank[r].push_back(std::move(m));
    }
    per_rank[r].push_back(Request(MessageKind::kStepDone, 0, r, 0, 0, 0));
  }
  for (const auto& answers : AskTogether(&worker, std::move(per_rank))) {
    for (const Message& a : answers) {
      EXPECT_EQ(a.header.status_code, 0) << a.error_text;
      EXPECT_TRUE(a.payload.empty() || a.payload.dim(0) == 0);
    }
  }
  EXPECT_EQ(worker.next_step(), 1);
  EXPECT_EQ(worker.ParameterDigest(), before);  // No tokens: no update.
}

// A shard whose every micro-batch has had its backward gets its gradient
// computed while the worker waits for the StepDones (the same GEMM over
// the same inputs as at the last StepDone, so the same bits); a request
// repeated after that is still refused.
TEST(WorkerServiceTest, GradientsComputedWhileIdleMatchTheUsualOnes) {
  const std::string usual = RunInterleaved("adamw", 0);
  WorkerService worker(TestConfig("adamw"), "w");
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  const std::string early = "switchyard_worker_early_gradients_total";
  for (int step = 0; step < kSteps; ++step) {
    std::vector<std::vector<Message>> before_done, done;
    for (int r = 0; r < kRanks; ++r) {
      std::vector<Message> all = TrainerStep(step, r);
      // The dense pushes and StepDone wait until the gradients are in.
      done.emplace_back(std::make_move_iterator(all.end() - 3),
                        std::make_move_iterator(all.end()));
      all.resize(all.size() - 3);
      before_done.push_back(std::move(all));
    }
    const uint64_t computed = CounterValue(early);
    for (const auto& answers : AskTogether(&worker, std::move(before_done))) {
      for (const Message& a : answers) {
        ASSERT_EQ(a.header.status_code, 0) << a.error_text;
      }
    }
    // Every expert shard (2 experts x 2 shards) had both micro-batches.
    const auto deadline = std::chrono::steady_clock::now() + Ms(10000);
    while (CounterValue(early) < computed + 4 &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(Ms(1));
    }
    EXPECT_EQ(CounterValue(early), computed + 4) << "step " << step;
    Message again =
        Request(MessageKind::kExpertBackward, step, 0, kMicroBatches - 1, 0, 0);
    EXPECT_EQ(Ask(&worker, std::move(again)).header.status_code,
              static_cast<int32_t>(StatusCode::kAlreadyExists));
    for (const auto& answers : AskTogether(&worker, std::move(done))) {
      for (const Message& a : answers) {
        ASSERT_EQ(a.header.status_code, 0) << a.error_text;
      }
    }
  }
  EXPECT_EQ(worker.ParameterDigest(), usual);
}

TEST(WorkerServiceTest, OverUcxMatchesInProcess) {
  const std::string reference = RunInterleaved("adamw", 0);
  WorkerService worker(TestConfig("adamw"), "w");
  ASSERT_TRUE(worker.Start().ok());
  ASSERT_TRUE(worker.ApplyRouting(Routing(kEpoch)).ok());
  auto server =
      transport::NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
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
          transport::NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
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
}  // namespace switchyard::expert_worker::worker_testing
