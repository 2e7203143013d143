// A worker's initial values and dense tables: checkpoint.init_from (with
// experts upcycled from a dense FFN), dense values that do not depend on the
// sharding, dense updates that sum the trainers' pushes in rank order, and
// dense requests refused with their reason.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "common/model_shape.h"
#include "expert_worker/optimizer.h"
#include "expert_worker/worker_service.h"
#include "storage/safetensors.h"
#include "tests/expert_worker/worker_test_util.h"

namespace switchyard::expert_worker::worker_testing {
namespace {

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
  // So is a dense tensor with the right count in another shape (it used to
  // load transposed values silently), naming both shapes.
  ASSERT_TRUE(
      storage::WriteSafetensors(path, {{"tok_embed", random({8, 32})}}, {})
          .ok());
  WorkerService transposed(config, "w");
  ASSERT_TRUE(transposed.Start().ok());
  s = transposed.ApplyRouting(Routing(kEpoch));
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("checkpoint.init_from: " + path +
                             ": tensor tok_embed has shape (8, 32); the "
                             "model expects (32, 8)"),
            std::string::npos)
      << s.message();
  transposed.Shutdown();
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

}  // namespace
}  // namespace switchyard::expert_worker::worker_testing
