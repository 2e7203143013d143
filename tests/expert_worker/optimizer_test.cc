// Optimizers against steps computed by hand (the expected values below were
// worked out from the formulas in optimizer.h in double precision).
#include "expert_worker/optimizer.h"

#include <gtest/gtest.h>
#include <strings.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/config.h"
#include "expert_worker/cpu/activation_kernels.h"
#include "expert_worker/cpu/blas_kernels.h"

namespace switchyard::expert_worker {
namespace {

config::TrainingConfig Training(std::vector<std::string> overrides) {
  auto loaded = ParseConfig("", "test", overrides);
  CHECK(loaded.ok()) << loaded.status().ToString();
  return loaded->config.training();
}

TEST(LearningRateTest, Schedules) {
  auto warm = Training({"training.learning_rate=1", "training.warmup_steps=4",
                        "training.steps=104", "training.lr_schedule=cosine"});
  EXPECT_DOUBLE_EQ(LearningRate(warm, 0), 0.25);
  EXPECT_DOUBLE_EQ(LearningRate(warm, 3), 1.0);
  EXPECT_DOUBLE_EQ(LearningRate(warm, 4), 1.0);      // Cosine starts at peak,
  EXPECT_NEAR(LearningRate(warm, 54), 0.5, 1e-12);   // is half at mid-way,
  EXPECT_NEAR(LearningRate(warm, 104), 0.0, 1e-12);  // and 0 at the end.
  auto isqrt = Training({"training.learning_rate=1", "training.warmup_steps=4",
                         "training.lr_schedule=inverse_sqrt"});
  EXPECT_DOUBLE_EQ(LearningRate(isqrt, 3), 1.0);
  EXPECT_DOUBLE_EQ(LearningRate(isqrt, 15), 0.5);  // sqrt(4 / 16)
  auto constant =
      Training({"training.learning_rate=0.1", "training.warmup_steps=0",
                "training.lr_schedule=constant"});
  EXPECT_DOUBLE_EQ(LearningRate(constant, 1000), 0.1);
}

TEST(AdamWTest, TwoHandComputedSteps) {
  auto t = Training({"training.optimizer=adamw", "training.learning_rate=0.1",
                     "training.warmup_steps=0", "training.lr_schedule=constant",
                     "training.weight_decay=0.01"});
  auto opt = Optimizer::Create(t).value();
  Tensor p = Tensor::Zeros(DType::kF32, {1}).value();
  p.f32()[0] = 1.0f;
  OptimizerState state = opt->NewState(p).value();
  Tensor g = Tensor::Zeros(DType::kF32, {1}).value();
  g.f32()[0] = 0.5f;
  ASSERT_TRUE(opt->Apply(0, g, &p, &state).ok());
  // m = 0.05, v = 0.00025, mhat = 0.5, vhat = 0.25:
  // p = 1 - 0.1 * (0.5 / (0.5 + 1e-8) + 0.01 * 1) = 0.899000002
  EXPECT_NEAR(p.f32()[0], 0.899000002, 1e-6);
  g.f32()[0] = -0.25f;
  ASSERT_TRUE(opt->Apply(1, g, &p, &state).ok());
  // m = 0.02, v = 0.00031225, mhat = 0.02 / 0.19, vhat = v / 0.001999.
  EXPECT_NEAR(p.f32()[0], 0.8714672987, 1e-6);
}

TEST(AdafactorTest, FactoredMatrixSteps) {
  auto t =
      Training({"training.optimizer=adafactor", "training.learning_rate=0.1",
                "training.warmup_steps=0", "training.lr_schedule=constant"});
  auto opt = Optimizer::Create(t).value();
  Tensor p = Tensor::Zeros(DType::kF32, {2, 2}).value();
  const float p0[] = {1.0f, -1.0f, 0.5f, 2.0f};
  std::copy(p0, p0 + 4, p.f32());
  OptimizerState state = opt->NewState(p).value();
  EXPECT_EQ(state.row.num_elements(), 2);  // Factored: 2 + 2 numbers,
  EXPECT_EQ(state.col.num_elements(), 2);  // not 4.
  EXPECT_TRUE(state.m.empty());            // No momentum.
  Tensor g = Tensor::Zeros(DType::kF32, {2, 2}).value();
  const float g1[] = {0.1f, 0.2f, 0.3f, 0.4f};
  std::copy(g1, g1 + 4, g.f32());
  ASSERT_TRUE(opt->Apply(0, g, &p, &state).ok());
  // Step 1: b2 = 0, r = (0.025, 0.125), c = (0.05, 0.1), mean(r) = 0.075,
  // u = g / sqrt(r_i c_j / 0.075); RMS(u) > 1 so u is clipped.
  const double want1[] = {0.9225403331, -1.1095445115, 0.3960769515,
                          1.9020204103};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(p.f32()[i], want1[i], 1e-5) << i;
  const float g2[] = {-0.2f, 0.1f, 0.0f, 0.3f};
  std::copy(g2, g2 + 4, g.f32());
  ASSERT_TRUE(opt->Apply(1, g, &p, &state).ok());
  const double want2[] = {1.0819208665, -1.1635762280, 0.3960769515,
                          1.8108647981};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(p.f32()[i], want2[i], 1e-5) << i;
}

TEST(AdafactorTest, VectorsUseFullSecondMoments) {
  auto t =
      Training({"training.optimizer=adafactor", "training.learning_rate=1",
                "training.warmup_steps=0", "training.lr_schedule=constant"});
  auto opt = Optimizer::Create(t).value();
  Tensor p = Tensor::Zeros(DType::kF32, {2}).value();
  OptimizerState state = opt->NewState(p).value();
  EXPECT_EQ(state.v.num_elements(), 2);
  Tensor g = Tensor::Zeros(DType::kF32, {2}).value();
  g.f32()[0] = 3.0f;
  g.f32()[1] = -0.5f;
  ASSERT_TRUE(opt->Apply(0, g, &p, &state).ok());
  // b2 = 0: v = g^2, u = sign(g), RMS(u) = 1: p = -sign(g).
  EXPECT_FLOAT_EQ(p.f32()[0], -1.0f);
  EXPECT_FLOAT_EQ(p.f32()[1], 1.0f);
}

TEST(OptimizerTest, ASweepIsTheSameOnAnyThreadCountAndWritesItsBf16Copy) {
  // Large enough to run on every OpenMP thread (and not a whole number of
  // blocks or tiles): the bits must not depend on the thread count, and the
  // bf16 copy a sweep writes is the rounding of the updated parameters.
  // Shapes: a matrix; a dense shard's (1, n) row, split into tiles; a few
  // long rows; a vector (Adafactor's full second moments).
  const std::vector<std::vector<int64_t>> shapes = {
      {301, 1001}, {1, 70001}, {3, 9001}, {70001}};
  for (const char* name : {"adamw", "adafactor"}) {
    for (const auto& shape : shapes) {
      const std::string what = std::string(name) + " " +
                               std::to_string(shape.front()) + "x" +
                               std::to_string(shape.back());
      auto t = Training({std::string("training.optimizer=") + name,
                         "training.learning_rate=0.01",
                         "training.weight_decay=0.1"});
      auto opt = Optimizer::Create(t).value();
      auto fill = [&](uint32_t seed) {
        Tensor x = Tensor::Zeros(DType::kF32, shape).value();
        for (int64_t i = 0; i < x.num_elements(); ++i) {
          seed = seed * 1664525u + 1013904223u;
          x.f32()[i] = static_cast<float>(seed >> 8) / (1 << 24) - 0.5f;
        }
        return x;
      };
      const Tensor g = fill(7);
      Tensor params[2] = {fill(3), fill(3)};
      Tensor copy = Tensor::Zeros(DType::kBF16, shape).value();
      for (int threads : {1, 2}) {
        SetKernelThreads(threads);
        Tensor& p = params[threads - 1];
        OptimizerState state = opt->NewState(p).value();
        ASSERT_TRUE(opt->Apply(0, g, &p, &state).ok()) << what;
        ASSERT_TRUE(opt->Apply(1, g, &p, &state, &copy).ok()) << what;
      }
      SetKernelThreads(1);
      for (int64_t i = 0; i < params[0].num_elements(); ++i) {
        ASSERT_EQ(params[0].f32()[i], params[1].f32()[i]) << what << " " << i;
        ASSERT_EQ(copy.bf16()[i].bits, FloatToBf16(params[1].f32()[i]).bits)
            << what << " " << i;
      }
      // Something moved.
      EXPECT_NE(params[0].f32()[0], fill(3).f32()[0]) << what;
      std::vector<int64_t> other = shape;
      std::reverse(other.begin(), other.end());
      other.push_back(1);
      Tensor wrong = Tensor::Zeros(DType::kBF16, other).value();
      OptimizerState state = opt->NewState(params[0]).value();
      EXPECT_FALSE(opt->Apply(2, g, &params[0], &state, &wrong).ok()) << what;
    }
  }
}

TEST(OptimizerTest, RejectsMismatchedGradients) {
  auto opt = Optimizer::Create(Training({})).value();
  Tensor p = Tensor::Zeros(DType::kF32, {2, 3}).value();
  Tensor g = Tensor::Zeros(DType::kF32, {3, 2}).value();
  OptimizerState state = opt->NewState(p).value();
  EXPECT_EQ(opt->Apply(0, g, &p, &state).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace switchyard::expert_worker

namespace switchyard::expert_worker {
namespace {

TEST(BlasKernelsTest, ProcessRunsTheResolvedKernels) {
  EXPECT_EQ(ResolveBlasCoreType("Haswell"), "Haswell");
  const char* requested = std::getenv("SWITCHYARD_BLAS_CORETYPE");
  const std::string want = ResolveBlasCoreType(requested ? requested : "auto");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512cd") && requested == nullptr) {
    EXPECT_EQ(want, "SkylakeX");
  }
  // The test main called SelectBlasKernels, whatever OPENBLAS_CORETYPE the
  // host's environment had.
  if (!want.empty()) {
    EXPECT_EQ(strcasecmp(BlasKernelName(), want.c_str()), 0)
        << BlasKernelName() << " vs " << want;
  }
}

TEST(BlasKernelsTest, ProcessLoadsOpenBlasBuiltForOpenMp) {
  // The pthread build (what the dynamic loader finds by default) runs a
  // thread pool of its own that competes with OpenMP's for the cores.
  EXPECT_STREQ(BlasThreading(), "OpenMP");
}

}  // namespace
}  // namespace switchyard::expert_worker
