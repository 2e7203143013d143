// Expert compute against an independent fp64 reference and against finite
// differences of that reference.
#include "expert_worker/expert_ffn.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "tests/testing/gradient_check.h"

namespace switchyard::expert_worker {
namespace {

using ::switchyard::testing::CentralDifferences;

// ---- fp64 reference, written from the formulas, sharing no code. ----
using Mat = std::vector<double>;  // Row-major.

double RefAct(Activation act, double gate, double up) {
  switch (act) {
    case Activation::kGelu:
      return 0.5 * gate *
             (1 + std::tanh(std::sqrt(2 / M_PI) *
                            (gate + 0.044715 * gate * gate * gate)));
    case Activation::kRelu:
      return gate > 0 ? gate : 0;
    case Activation::kSwiglu:
      return gate / (1 + std::exp(-gate)) * up;
  }
  return 0;
}

struct RefParams {
  Mat w1, b1, w2, b2;
};

// y (T, d) for x (T, d); `keep` (T, f) multiplies the activations (expert
// dropout) when not empty.
Mat RefForward(const ExpertShape& s, const RefParams& p, const Mat& x,
               int tokens, const Mat& keep) {
  const int d = s.d_model, f = s.d_ff_shard, gf = s.gates() * f;
  Mat y(tokens * d, 0.0);
  for (int t = 0; t < tokens; ++t) {
    Mat h(gf, 0.0);
    for (int j = 0; j < gf; ++j) {
      double acc = s.has_b1 ? p.b1[j] : 0.0;
      for (int i = 0; i < d; ++i) acc += x[t * d + i] * p.w1[i * gf + j];
      h[j] = acc;
    }
    for (int o = 0; o < d; ++o) {
      double acc = s.has_b2 ? p.b2[o] : 0.0;
      for (int j = 0; j < f; ++j) {
        const double a =
            RefAct(s.activation, h[j],
                   s.activation == Activation::kSwiglu ? h[f + j] : 0.0) *
            (keep.empty() ? 1.0 : keep[t * f + j]);
        acc += a * p.w2[j * d + o];
      }
      y[t * d + o] = acc;
    }
  }
  return y;
}

// L = sum(y * r).
double RefLoss(const ExpertShape& s, const RefParams& p, const Mat& x,
               const Mat& r, int tokens, const Mat& keep) {
  const Mat y = RefForward(s, p, x, tokens, keep);
  double loss = 0;
  for (size_t i = 0; i < y.size(); ++i) loss += y[i] * r[i];
  return loss;
}

Tensor ToTensor(const Mat& m, std::vector<int64_t> shape) {
  Tensor t = Tensor::Zeros(DType::kF32, shape).value();
  for (size_t i = 0; i < m.size(); ++i) t.f32()[i] = static_cast<float>(m[i]);
  return t;
}

// max |a - b| / max(max |b|, 1e-6)
double RelErr(const Tensor& a, const Mat& b) {
  double err = 0, scale = 1e-6;
  for (size_t i = 0; i < b.size(); ++i) {
    err = std::max(err, std::abs(a.f32()[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return err / scale;
}

ExpertParams Params(Tensor w1, Tensor b1, Tensor w2, Tensor b2) {
  ExpertParams p;
  p.w1 = std::move(w1);
  p.b1 = std::move(b1);
  p.w2 = std::move(w2);
  p.b2 = std::move(b2);
  return p;
}

Mat Random(std::mt19937& rng, size_t n, double scale) {
  std::normal_distribution<double> dist(0.0, scale);
  Mat m(n);
  for (auto& v : m) v = dist(rng);
  return m;
}

struct Case {
  Activation activation;
  bool bias;
  int tokens;
  bool dropout = false;  // Drop half the units, scale the rest by 2.
};

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  static const char* kActivations[] = {"gelu", "relu", "swiglu"};
  return std::string(kActivations[static_cast<int>(info.param.activation)]) +
         (info.param.bias ? "_bias_" : "_nobias_") +
         std::to_string(info.param.tokens) + "tokens" +
         (info.param.dropout ? "_dropout" : "");
}

class ExpertFfnTest : public ::testing::TestWithParam<Case> {};

TEST_P(ExpertFfnTest, MatchesReferenceAndFiniteDifferences) {
  const Case c = GetParam();
  ExpertShape s;
  s.d_model = 6;
  s.d_ff_shard = 5;
  s.activation = c.activation;
  s.has_b1 = s.has_b2 = c.bias;
  const int d = s.d_model, f = s.d_ff_shard, gf = s.gates() * f, T = c.tokens;
  std::mt19937 rng(11 + T + static_cast<int>(c.activation) * 7 + c.bias);
  RefParams ref{Random(rng, d * gf, 0.5), Random(rng, gf, 0.3),
                Random(rng, f * d, 0.5), Random(rng, d, 0.3)};
  Mat x = Random(rng, T * d, 1.0), r = Random(rng, T * d, 1.0);
  Mat keep;
  std::vector<float> keep_f;
  if (c.dropout) {
    for (int i = 0; i < T * f; ++i) keep.push_back(rng() % 2 ? 2.0 : 0.0);
    keep_f.assign(keep.begin(), keep.end());
  }
  const float* kp = c.dropout ? keep_f.data() : nullptr;

  auto gemm = NewCpuGemm(1);
  ExpertFfn ffn(s, gemm.get());
  ExpertParams p = ExpertParams::Zeros(s).value();
  p.w1 = ToTensor(ref.w1, {d, gf});
  p.w2 = ToTensor(ref.w2, {f, d});
  if (c.bias) {
    p.b1 = ToTensor(ref.b1, {gf});
    p.b2 = ToTensor(ref.b2, {d});
  }
  Tensor xt = ToTensor(x, {T, d}), dy = ToTensor(r, {T, d});
  Tensor h = Tensor::Zeros(DType::kF32, {T, gf}).value();
  Tensor y = Tensor::Zeros(DType::kF32, {T, d}).value();
  ASSERT_TRUE(ffn.Forward(p, xt, kp, &h, &y).ok());
  EXPECT_LT(RelErr(y, RefForward(s, ref, x, T, keep)), 1e-5);

  Tensor dh = Tensor::Zeros(DType::kF32, {T, gf}).value();
  Tensor dx = Tensor::Zeros(DType::kF32, {T, d}).value();
  Tensor a = Tensor::Zeros(DType::kF32, {T, f}).value();
  ASSERT_TRUE(ffn.BackwardInput(p, h, dy, kp, &dh, &a, &dx).ok());
  ExpertParams grads = ExpertParams::Zeros(s).value();
  ASSERT_TRUE(ffn.AccumulateGrads(xt, a, dh, dy, &grads).ok());
  if (T == 0) return;

  auto loss = [&] { return RefLoss(s, ref, x, r, T, keep); };
  EXPECT_LT(RelErr(dx, CentralDifferences(&x, loss, 1e-5)), 1e-4);
  EXPECT_LT(RelErr(grads.w1, CentralDifferences(&ref.w1, loss, 1e-5)), 1e-4);
  EXPECT_LT(RelErr(grads.w2, CentralDifferences(&ref.w2, loss, 1e-5)), 1e-4);
  if (c.bias) {
    EXPECT_LT(RelErr(grads.b1, CentralDifferences(&ref.b1, loss, 1e-5)), 1e-4);
    EXPECT_LT(RelErr(grads.b2, CentralDifferences(&ref.b2, loss, 1e-5)), 1e-4);
  }
  // Accumulating a second identical batch doubles the gradient exactly.
  const float w1_once = grads.w1.f32()[0];
  ASSERT_TRUE(ffn.AccumulateGrads(xt, a, dh, dy, &grads).ok());
  EXPECT_EQ(grads.w1.f32()[0], 2 * w1_once);
  // ComputeGrads overwrites: the doubled gradient is back to one batch's,
  // element for element, biases included.
  ExpertParams once = ExpertParams::Zeros(s).value();
  ASSERT_TRUE(ffn.AccumulateGrads(xt, a, dh, dy, &once).ok());
  ASSERT_TRUE(ffn.ComputeGrads(xt, a, dh, dy, &grads).ok());
  for (auto [got, want] : {std::pair{&grads.w1, &once.w1},
                           {&grads.w2, &once.w2},
                           {&grads.b1, &once.b1},
                           {&grads.b2, &once.b2}}) {
    ASSERT_EQ(got->num_elements(), want->num_elements());
    for (int64_t i = 0; i < got->num_elements(); ++i) {
      ASSERT_EQ(got->f32()[i], want->f32()[i]) << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ExpertFfnTest,
    ::testing::Values(
        Case{Activation::kGelu, true, 7}, Case{Activation::kGelu, false, 1},
        Case{Activation::kRelu, true, 7}, Case{Activation::kSwiglu, true, 7},
        Case{Activation::kSwiglu, false, 3}, Case{Activation::kGelu, true, 0},
        Case{Activation::kGelu, true, 7, true},
        Case{Activation::kSwiglu, true, 5, true}),
    CaseName);

TEST(ExpertFfnBf16Test, WithinStatedTolerance) {
  // bf16 operands (8-bit mantissa, relative rounding 2^-9) with fp32
  // accumulation: outputs within 2% of the largest fp64 reference output.
  ExpertShape s;
  s.d_model = 64;
  s.d_ff_shard = 128;
  s.compute_dtype = DType::kBF16;
  std::mt19937 rng(5);
  const int T = 32, d = 64, f = 128;
  RefParams ref{Random(rng, d * f, 0.1), Random(rng, f, 0.1),
                Random(rng, f * d, 0.1), Random(rng, d, 0.1)};
  Mat x = Random(rng, T * d, 1.0);
  auto gemm = NewCpuGemm(1);
  ExpertFfn ffn(s, gemm.get());
  ExpertParams p = Params(ToTensor(ref.w1, {d, f}), ToTensor(ref.b1, {f}),
                          ToTensor(ref.w2, {f, d}), ToTensor(ref.b2, {d}));
  Tensor h = Tensor::Zeros(DType::kF32, {T, f}).value();
  Tensor y = Tensor::Zeros(DType::kF32, {T, d}).value();
  ASSERT_TRUE(ffn.Forward(p, ToTensor(x, {T, d}), &h, &y).ok());
  const double err = RelErr(y, RefForward(s, ref, x, T, {}));
  EXPECT_LT(err, 2e-2);
  EXPECT_GT(err, 1e-5) << "bf16 rounding should be visible";
}

TEST(ExpertFfnBf16Test, CachedBf16WeightsGiveTheSameBits) {
  ExpertShape s;
  s.d_model = 32;
  s.d_ff_shard = 48;
  s.activation = Activation::kSwiglu;
  s.compute_dtype = DType::kBF16;
  std::mt19937 rng(8);
  const int T = 9, d = 32, gf = 96, f = 48;
  auto gemm = NewCpuGemm(1);
  ExpertFfn ffn(s, gemm.get());
  ExpertParams p = Params(ToTensor(Random(rng, d * gf, 0.2), {d, gf}),
                          ToTensor(Random(rng, gf, 0.1), {gf}),
                          ToTensor(Random(rng, f * d, 0.2), {f, d}),
                          ToTensor(Random(rng, d, 0.1), {d}));
  Tensor x = ToTensor(Random(rng, T * d, 1.0), {T, d});
  Tensor dy = ToTensor(Random(rng, T * d, 1.0), {T, d});
  auto run = [&](const ExpertParams& params, Tensor* y, Tensor* dx) {
    Tensor h = Tensor::Zeros(DType::kF32, {T, gf}).value();
    Tensor dh = Tensor::Zeros(DType::kF32, {T, gf}).value();
    Tensor a = Tensor::Zeros(DType::kF32, {T, f}).value();
    ASSERT_TRUE(ffn.Forward(params, x, &h, y).ok());
    ASSERT_TRUE(ffn.BackwardInput(params, h, dy, &dh, &a, dx).ok());
  };
  Tensor y1 = Tensor::Zeros(DType::kF32, {T, d}).value();
  Tensor dx1 = Tensor::Zeros(DType::kF32, {T, d}).value();
  run(p, &y1, &dx1);
  ASSERT_TRUE(p.RefreshBf16().ok());
  Tensor y2 = Tensor::Zeros(DType::kF32, {T, d}).value();
  Tensor dx2 = Tensor::Zeros(DType::kF32, {T, d}).value();
  run(p, &y2, &dx2);
  EXPECT_EQ(std::memcmp(y1.data(), y2.data(), y1.num_bytes()), 0);
  EXPECT_EQ(std::memcmp(dx1.data(), dx2.data(), dx1.num_bytes()), 0);
}

TEST(ExpertFfnTest, RejectsMisSizedInputs) {
  ExpertShape s;
  s.d_model = 4;
  s.d_ff_shard = 8;
  auto gemm = NewCpuGemm(1);
  ExpertFfn ffn(s, gemm.get());
  ExpertParams p = ExpertParams::Zeros(s).value();
  Tensor x = Tensor::Zeros(DType::kF32, {3, 5}).value();  // d_model is 4.
  Tensor h = Tensor::Zeros(DType::kF32, {3, 8}).value();
  Tensor y = Tensor::Zeros(DType::kF32, {3, 4}).value();
  EXPECT_EQ(ffn.Forward(p, x, &h, &y).code(), StatusCode::kInvalidArgument);
  Tensor good = Tensor::Zeros(DType::kF32, {3, 4}).value();
  Tensor small_h = Tensor::Zeros(DType::kF32, {2, 8}).value();
  EXPECT_EQ(ffn.Forward(p, good, &small_h, &y).code(),
            StatusCode::kInvalidArgument);
  ExpertParams wrong = p;
  wrong.b2 = Tensor();  // Shape says there is a b2.
  EXPECT_EQ(ffn.Forward(wrong, good, &h, &y).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace switchyard::expert_worker
