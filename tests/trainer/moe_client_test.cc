// Dispatch and combine against two real workers over UCX: the result equals,
// bit for bit, the same experts computed in this process from the same
// initial parameters; empty experts get no request; failures are errors.
#include "trainer/moe_client.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <thread>

#include "common/config.h"
#include "expert_worker/expert_init.h"
#include "expert_worker/worker_service.h"
#include "tests/testing/data_plane_options.h"
#include "tests/testing/ucx_workers.h"

namespace switchyard::trainer {
namespace {

using Ms = std::chrono::milliseconds;
constexpr int T = 12, D = 16, E = 4, K = 2, S = 2;
constexpr uint64_t kEpoch = 3;

config::SwitchyardConfig Config() {
  auto loaded = ParseConfig(
      "", "test",
      {"cluster.trainers=1", "cluster.workers=2", "model.num_layers=2",
       "model.moe_every=2", "model.num_experts=4", "model.top_k=2",
       "model.shards_per_expert=2", "model.d_model=16", "model.d_ff=32",
       "model.num_heads=2", "model.seq_len=8", "model.vocab_size=32",
       "model.dense_shards=1", "training.threads=1",
       "transport.request_timeout_ms=5000"});
  CHECK(loaded.ok()) << loaded.status().ToString();
  return loaded->config;
}

class MoeClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = Config();
    std::string error;
    ASSERT_TRUE(workers_.Start(config_, 2, &error)) << error;
    // Shard (e, s) lives on worker (e + s) % 2: every expert spans both.
    routing_.set_epoch(kEpoch);
    workers_.AddTo(&routing_);
    for (int e = 0; e < E; ++e) {
      for (int s = 0; s < S; ++s) {
        auto* entry = routing_.add_entries();
        entry->mutable_shard()->set_kind(control::EXPERT);
        entry->mutable_shard()->set_expert(e);
        entry->mutable_shard()->set_shard(s);
        entry->set_worker((e + s) % 2);
      }
    }
    ASSERT_TRUE(workers_.ApplyRouting(routing_));
    client_plane_ =
        transport::NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
    ASSERT_TRUE(client_plane_->Start(nullptr).ok());
    client_ = std::make_unique<MoeLayerClient>(client_plane_.get(), config_, 0);
    client_->SetRouting(routing_);
  }
  void TearDown() override {
    client_plane_->Shutdown();
    workers_.Shutdown();
  }

  config::SwitchyardConfig config_;
  testing::UcxWorkers workers_;
  std::unique_ptr<transport::DataPlane> client_plane_;
  std::unique_ptr<MoeLayerClient> client_;
  control::RoutingTable routing_;
};

Tensor RandomTensor(std::mt19937& rng, int64_t rows, int64_t cols) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Tensor t = Tensor::Zeros(DType::kF32, {rows, cols}).value();
  for (int64_t i = 0; i < rows * cols; ++i) t.f32()[i] = dist(rng);
  return t;
}

// Routes x (T, D) with W (D, E) to the top k experts.
RouterState<float> Route(const Tensor& x, const Tensor& w, int k) {
  RouterOptions ro;
  ro.num_experts = E;
  ro.top_k = k;
  return RouteForward(ro, x.f32(), T, D, w.f32(), nullptr);
}

TEST_F(MoeClientTest, MatchesInProcessExpertsBitForBit) {
  std::mt19937 rng(21);
  Tensor x = RandomTensor(rng, T, D);
  Tensor w = RandomTensor(rng, D, E);
  const RouterState<float> route = Route(x, w, K);
  auto y = client_->Forward(0, 0, 0, x, route);
  ASSERT_TRUE(y.ok()) << y.status().ToString();
  Tensor dy = RandomTensor(rng, T, D);
  Tensor dx;
  std::vector<float> d_gate;
  ASSERT_TRUE(client_->Backward(0, 0, 0, dy, &dx, &d_gate).ok());

  // Reference: the same batches through the same expert code, here.
  auto gemm = expert_worker::NewCpuGemm(1);
  // The same shard parameters and expert function the workers build.
  auto ParamsOf = [&](int e, int s) {
    return expert_worker::InitialExpertParams(config_, ShardId::Expert(0, e, s))
        .value();
  };
  auto FfnOf = [&](int s) {
    return expert_worker::ExpertFfn(
        expert_worker::ExpertShardShape(config_, s).value(), gemm.get());
  };
  Tensor y_ref = Tensor::Zeros(DType::kF32, {T, D}).value();
  Tensor dx_ref = Tensor::Zeros(DType::kF32, {T, D}).value();
  std::vector<float> d_gate_ref(T * K, 0.0f);
  std::vector<Tensor> expert_out(E);
  std::vector<std::vector<std::pair<int, int>>> rows(E);
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < K; ++j) rows[route.expert[t * K + j]].push_back({t, j});
  }
  for (int e = 0; e < E; ++e) {
    if (rows[e].empty()) continue;
    const int64_t n = rows[e].size();
    Tensor xe = Tensor::Zeros(DType::kF32, {n, D}).value();
    Tensor dye = Tensor::Zeros(DType::kF32, {n, D}).value();
    for (int64_t r = 0; r < n; ++r) {
      std::memcpy(xe.f32() + r * D, x.f32() + rows[e][r].first * D, D * 4);
    }
    Tensor out_sum, dx_sum;
    std::vector<Tensor> hidden(S);
    for (int s = 0; s < S; ++s) {
      const auto params = ParamsOf(e, s);
      const expert_worker::ExpertFfn ffn = FfnOf(s);
      hidden[s] = Tensor::Zeros(DType::kF32, {n, 16}).value();
      Tensor out = Tensor::Zeros(DType::kF32, {n, D}).value();
      ASSERT_TRUE(ffn.Forward(params, xe, &hidden[s], &out).ok());
      if (s == 0) {
        out_sum = out;
      } else {
        for (int64_t i = 0; i < n * D; ++i) out_sum.f32()[i] += out.f32()[i];
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      const auto [t, j] = rows[e][r];
      float dot = 0;
      for (int i = 0; i < D; ++i) {
        dye.f32()[r * D + i] = route.gate[t * K + j] * dy.f32()[t * D + i];
        dot += dy.f32()[t * D + i] * out_sum.f32()[r * D + i];
      }
      d_gate_ref[t * K + j] = dot;
    }
    for (int s = 0; s < S; ++s) {
      const auto params = ParamsOf(e, s);
      const expert_worker::ExpertFfn ffn = FfnOf(s);
      Tensor dh = Tensor::Zeros(DType::kF32, {n, 16}).value();
      Tensor a = Tensor::Zeros(DType::kF32, {n, 16}).value();
      Tensor dxe = Tensor::Zeros(DType::kF32, {n, D}).value();
      ASSERT_TRUE(
          ffn.BackwardInput(params, hidden[s], dye, &dh, &a, &dxe).ok());
      if (s == 0) {
        dx_sum = dxe;
      } else {
        for (int64_t i = 0; i < n * D; ++i) dx_sum.f32()[i] += dxe.f32()[i];
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      float* dxt = dx_ref.f32() + rows[e][r].first * D;
      for (int i = 0; i < D; ++i) dxt[i] += dx_sum.f32()[r * D + i];
    }
    expert_out[e] = out_sum;
  }
  std::vector<int> cursor(E, 0);
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < K; ++j) {
      const int e = route.expert[t * K + j];
      const float* out = expert_out[e].f32() + cursor[e]++ * D;
      for (int i = 0; i < D; ++i) {
        y_ref.f32()[t * D + i] += route.gate[t * K + j] * out[i];
      }
    }
  }
  EXPECT_EQ(std::memcmp(y->data(), y_ref.data(), y_ref.num_bytes()), 0);
  EXPECT_EQ(std::memcmp(dx.data(), dx_ref.data(), dx_ref.num_bytes()), 0);
  EXPECT_EQ(d_gate, d_gate_ref);

  // The step completes on both workers.
  ASSERT_TRUE(client_->StepDone(0).ok());
  EXPECT_EQ(workers_.worker(0).next_step(), 1);
  EXPECT_EQ(workers_.worker(1).next_step(), 1);
}

TEST_F(MoeClientTest, EmptyExpertsGetNoRequest) {
  // All tokens prefer expert 2 (top-1): the other experts see nothing.
  std::mt19937 rng(5);
  Tensor x = RandomTensor(rng, T, D);
  for (int64_t i = 0; i < T * D; ++i) x.f32()[i] = std::abs(x.f32()[i]);
  Tensor w = Tensor::Zeros(DType::kF32, {D, E}).value();
  for (int i = 0; i < D; ++i) w.f32()[i * E + 2] = 1.0f;
  const auto route = Route(x, w, 1);
  ASSERT_TRUE(client_->Forward(0, 0, 0, x, route).ok());
  uint64_t tokens_elsewhere = 0, tokens_on_2 = 0;
  for (int w = 0; w < 2; ++w) {
    for (const auto& load : workers_.worker(w).TakeLoads()) {
      (load.shard().expert() == 2 ? tokens_on_2 : tokens_elsewhere) +=
          load.tokens();
    }
  }
  EXPECT_EQ(tokens_on_2, static_cast<uint64_t>(T * S));  // Both shards.
  EXPECT_EQ(tokens_elsewhere, 0u);
}

TEST_F(MoeClientTest, UnplacedShardAndLostWorkerAreErrors) {
  std::mt19937 rng(9);
  Tensor x = RandomTensor(rng, T, D);
  Tensor w = RandomTensor(rng, D, E);
  const auto route = Route(x, w, E);  // Every expert gets every token.
  control::RoutingTable partial = routing_;
  partial.mutable_entries(3)->set_worker(-1);
  client_->SetRouting(partial);
  auto r = client_->Forward(0, 0, 0, x, route);
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("L0.E1.S1 has no worker at epoch 3"),
            std::string::npos)
      << r.status().message();
  // A worker whose data plane is gone: an error within the deadline.
  client_->SetRouting(routing_);
  workers_.plane(1).Shutdown();
  const auto start = std::chrono::steady_clock::now();
  auto lost = client_->Forward(0, 1, 0, x, route);
  EXPECT_FALSE(lost.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, Ms(8000));
}

// A trainer that receives a routing table before the workers do: the
// workers refuse its requests as ABORTED (not ready) and the client sends
// them again until the workers catch up.
TEST_F(MoeClientTest, RetriesUntilWorkersHaveItsEpoch) {
  std::mt19937 rng(4);
  Tensor x = RandomTensor(rng, T, D);
  Tensor w = RandomTensor(rng, D, E);
  const auto route = Route(x, w, K);
  control::RoutingTable next = routing_;
  next.set_epoch(kEpoch + 1);
  client_->SetRouting(next);
  std::thread late([&] {
    std::this_thread::sleep_for(Ms(150));
    workers_.ApplyRouting(next);
  });
  const auto start = std::chrono::steady_clock::now();
  auto y = client_->Forward(0, 0, 0, x, route);
  late.join();
  ASSERT_TRUE(y.ok()) << y.status().ToString();
  EXPECT_GE(std::chrono::steady_clock::now() - start, Ms(100))
      << "answered before the workers had the epoch";
  EXPECT_TRUE(client_->StepDone(0).ok());
}

}  // namespace
}  // namespace switchyard::trainer
