// The dense-table client against real workers over UCX.
#include "trainer/dense_client.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "common/config.h"
#include "common/model_shape.h"
#include "expert_worker/optimizer.h"
#include "expert_worker/worker_service.h"
#include "tests/testing/data_plane_options.h"
#include "tests/testing/ucx_workers.h"
#include "trainer/moe_client.h"

namespace switchyard::trainer {
namespace {

config::SwitchyardConfig Config() {
  auto loaded = ParseConfig(
      "", "test",
      {"cluster.trainers=1", "cluster.workers=2", "model.num_layers=2",
       "model.moe_every=2", "model.num_experts=2", "model.d_model=8",
       "model.d_ff=16", "model.num_heads=2", "model.seq_len=8",
       "model.vocab_size=32", "model.dense_shards=3", "training.threads=1",
       "training.warmup_steps=0", "transport.request_timeout_ms=5000"});
  CHECK(loaded.ok()) << loaded.status().ToString();
  return loaded->config;
}

TEST(DenseClientTest, PullPushStepPull) {
  const auto config = Config();
  testing::UcxWorkers workers;
  std::string error;
  ASSERT_TRUE(workers.Start(config, 2, &error)) << error;
  control::RoutingTable routing;
  routing.set_epoch(2);
  workers.AddTo(&routing);
  for (int s = 0; s < 3; ++s) {
    auto* e = routing.add_entries();
    e->mutable_shard()->set_kind(control::DENSE);
    e->mutable_shard()->set_shard(s);
    e->set_worker(s % 2);
  }
  ASSERT_TRUE(workers.ApplyRouting(routing));
  auto plane =
      transport::NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
  ASSERT_TRUE(plane->Start(nullptr).ok());
  DenseTableClient client(plane.get(), config, 0);
  client.SetRouting(routing);

  auto before = client.Pull(0);
  ASSERT_TRUE(before.ok()) << before.status().ToString();
  const int64_t n = DenseParams(config.model());
  ASSERT_EQ(before->num_elements(), n);
  for (const DenseTensor& t : DenseLayout(config.model())) {
    if (t.init == DenseTensor::Init::kOnes) {
      EXPECT_EQ(before->f32()[t.offset], 1.0f) << t.name;
    }
  }
  Tensor grads = Tensor::Zeros(DType::kF32, {1, n}).value();
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) grads.f32()[i] = dist(rng);
  ASSERT_TRUE(client.Push(0, grads).ok());
  MoeLayerClient moe(plane.get(), config, 0);
  moe.SetRouting(routing);
  ASSERT_TRUE(moe.StepDone(0).ok());
  auto after = client.Pull(1);
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  // One AdamW step on the flat vector, elementwise like the shards'.
  auto optimizer = expert_worker::Optimizer::Create(config.training()).value();
  Tensor expected = before->Clone();
  auto state = optimizer->NewState(expected).value();
  ASSERT_TRUE(optimizer->Apply(0, grads, &expected, &state).ok());
  EXPECT_EQ(std::memcmp(after->data(), expected.data(), expected.num_bytes()),
            0);

  // Errors: wrong gradient size; an unplaced shard.
  Tensor short_grads = Tensor::Zeros(DType::kF32, {1, n - 1}).value();
  EXPECT_EQ(client.Push(1, short_grads).code(), StatusCode::kInvalidArgument);
  control::RoutingTable partial = routing;
  partial.mutable_entries(2)->set_worker(-1);
  client.SetRouting(partial);
  auto missing = client.Pull(1);
  EXPECT_EQ(missing.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(missing.status().message().find("D2 has no worker"),
            std::string::npos);
  plane->Shutdown();
  workers.Shutdown();
}

}  // namespace
}  // namespace switchyard::trainer
