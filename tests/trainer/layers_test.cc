// Every dense layer's backward against central differences in double, and
// the properties that define the layers (normalised rows, causality).
#include "trainer/layers.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>

#include "expert_worker/expert_ffn.h"
#include "tests/testing/gradient_check.h"

namespace switchyard::trainer {
namespace {

using Vec = std::vector<double>;

Vec Random(std::mt19937& rng, size_t n, double scale = 1.0) {
  std::normal_distribution<double> dist(0.0, scale);
  Vec v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

double Dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Checks `grad` == d loss / d *v by central differences.
void ExpectGrad(Vec* v, const Vec& grad, const std::function<double()>& loss,
                const char* what) {
  const Vec fd = ::switchyard::testing::CentralDifferences(v, loss, 1e-6);
  for (size_t i = 0; i < v->size(); ++i) {
    ASSERT_NEAR(grad[i], fd[i], 1e-6 * std::max(1.0, std::abs(fd[i])))
        << what << "[" << i << "]";
  }
}

TEST(LayersTest, RmsNormGradients) {
  std::mt19937 rng(1);
  const int n = 3, d = 6;
  Vec x = Random(rng, n * d), g = Random(rng, d), r = Random(rng, n * d);
  auto loss = [&] {
    Vec y(n * d);
    RmsNormForward(x.data(), g.data(), n, d, y.data());
    return Dot(y, r);
  };
  Vec dx(n * d), dg(d, 0.0);
  RmsNormBackward(x.data(), g.data(), r.data(), n, d, dx.data(), dg.data());
  ExpectGrad(&x, dx, loss, "dx");
  ExpectGrad(&g, dg, loss, "dg");
  // With g = 1 every row has unit root mean square.
  Vec ones(d, 1.0), y(n * d);
  RmsNormForward(x.data(), ones.data(), n, d, y.data());
  for (int row = 0; row < n; ++row) {
    double ms = 0;
    for (int i = 0; i < d; ++i) ms += y[row * d + i] * y[row * d + i];
    EXPECT_NEAR(ms / d, 1.0, 1e-4);
  }
}

TEST(LayersTest, LayerNormGradients) {
  std::mt19937 rng(2);
  const int n = 3, d = 5;
  Vec x = Random(rng, n * d), g = Random(rng, d), b = Random(rng, d),
      r = Random(rng, n * d);
  auto loss = [&] {
    Vec y(n * d);
    LayerNormForward(x.data(), g.data(), b.data(), n, d, y.data());
    return Dot(y, r);
  };
  Vec dx(n * d), dg(d, 0.0), db(d, 0.0);
  LayerNormBackward(x.data(), g.data(), r.data(), n, d, dx.data(), dg.data(),
                    db.data());
  ExpectGrad(&x, dx, loss, "dx");
  ExpectGrad(&g, dg, loss, "dg");
  ExpectGrad(&b, db, loss, "db");
}

class AttentionTest : public ::testing::TestWithParam<bool> {};

TEST_P(AttentionTest, GradientsAndCausality) {
  std::mt19937 rng(3);
  const int len = 5, d = 8, heads = 2;
  const RotaryTable table(len, d / heads);
  const RotaryTable* rotary = GetParam() ? &table : nullptr;
  Vec x = Random(rng, len * d), wq = Random(rng, d * d, 0.4),
      wk = Random(rng, d * d, 0.4), wv = Random(rng, d * d, 0.4),
      wo = Random(rng, d * d, 0.4), r = Random(rng, len * d);
  auto forward = [&](const Vec& input) {
    Vec y(len * d);
    AttentionCache<double> cache;
    AttentionForward(input.data(), wq.data(), wk.data(), wv.data(), wo.data(),
                     1, len, d, heads, rotary, y.data(), &cache);
    return y;
  };
  auto loss = [&] { return Dot(forward(x), r); };
  Vec y(len * d), dx(len * d), dwq(d * d, 0.0), dwk(d * d, 0.0),
      dwv(d * d, 0.0), dwo(d * d, 0.0);
  AttentionCache<double> cache;
  AttentionForward(x.data(), wq.data(), wk.data(), wv.data(), wo.data(), 1, len,
                   d, heads, rotary, y.data(), &cache);
  AttentionBackward(x.data(), wq.data(), wk.data(), wv.data(), wo.data(), 1,
                    len, d, heads, rotary, &cache, r.data(), dx.data(),
                    dwq.data(), dwk.data(), dwv.data(), dwo.data());
  ExpectGrad(&x, dx, loss, "dx");
  ExpectGrad(&wq, dwq, loss, "dwq");
  ExpectGrad(&wk, dwk, loss, "dwk");
  ExpectGrad(&wv, dwv, loss, "dwv");
  ExpectGrad(&wo, dwo, loss, "dwo");
  // Causal: changing the last token leaves earlier outputs unchanged.
  Vec changed = x;
  for (int i = 0; i < d; ++i) changed[(len - 1) * d + i] += 1.0;
  const Vec y2 = forward(changed);
  for (int i = 0; i < (len - 1) * d; ++i) EXPECT_EQ(y2[i], y[i]);
  // A sequence of length 1 attends only to itself.
  Vec one(d), y1(d);
  std::copy(x.begin(), x.begin() + d, one.begin());
  AttentionCache<double> c1;
  AttentionForward(one.data(), wq.data(), wk.data(), wv.data(), wo.data(), 1, 1,
                   d, heads, rotary, y1.data(), &c1);
  for (int i = 0; i < d; ++i) EXPECT_NEAR(y1[i], y[i], 1e-12);
}

TEST(LayersTest, CrossEntropyValueAndGradient) {
  std::mt19937 rng(4);
  const int n = 4, vocab = 7;
  Vec logits = Random(rng, n * vocab);
  std::vector<int32_t> targets = {0, 6, 3, 3};
  Vec dlogits(n * vocab);
  CrossEntropy(logits.data(), targets.data(), n, vocab, dlogits.data());
  auto loss = [&] {
    Vec scratch(n * vocab);
    return CrossEntropy(logits.data(), targets.data(), n, vocab,
                        scratch.data());
  };
  ExpectGrad(&logits, dlogits, loss, "dlogits");
  // Uniform logits: the loss is ln(vocab).
  Vec zeros(n * vocab, 0.0), scratch(n * vocab);
  EXPECT_NEAR(
      CrossEntropy(zeros.data(), targets.data(), n, vocab, scratch.data()),
      std::log(7.0), 1e-12);
}

INSTANTIATE_TEST_SUITE_P(Positions, AttentionTest, ::testing::Bool(),
                         [](const auto& info) {
                           return std::string(info.param ? "rotary" : "plain");
                         });

TEST(LayersTest, RotaryIsARotation) {
  std::mt19937 rng(5);
  const int len = 4, d = 8, heads = 2;
  Vec rows = Random(rng, len * d);
  Vec turned = rows;
  const RotaryTable table(len, d / heads);
  ApplyRotary(turned.data(), len, d, heads, table, false);
  // Position 0 does not turn; others keep each pair's length.
  for (int i = 0; i < d; ++i) EXPECT_EQ(turned[i], rows[i]);
  for (int p = 1; p < len; ++p) {
    for (int i = 0; i < d; i += 2) {
      const double a = std::hypot(rows[p * d + i], rows[p * d + i + 1]);
      const double b = std::hypot(turned[p * d + i], turned[p * d + i + 1]);
      EXPECT_NEAR(a, b, 1e-12);
    }
  }
  EXPECT_NE(turned, rows);
  ApplyRotary(turned.data(), len, d, heads, table, true);
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_NEAR(turned[i], rows[i], 1e-12);
  }
}

TEST(LayersTest, RotaryTableHoldsTheAnglesOfEveryPositionAndPair) {
  // Pair i of position p turns by p / 10000^(2i / hd): the table holds the
  // same cosines and sines as computing them at the rotation would.
  const int len = 96, hd = 32;
  const RotaryTable table(len, hd);
  ASSERT_EQ(table.cos.size(), static_cast<size_t>(len * hd / 2));
  for (int p = 0; p < len; ++p) {
    for (int i = 0; i < hd / 2; ++i) {
      const double theta =
          p / std::pow(kRopeTheta, static_cast<double>(2 * i) / hd);
      EXPECT_EQ(table.cos[p * hd / 2 + i], std::cos(theta));
      EXPECT_EQ(table.sin[p * hd / 2 + i], std::sin(theta));
    }
  }
}

// fp32 runs other code than the fp64 the gradient checks use (BLAS, the
// expert kernels): it must compute the same function to fp32 rounding.
std::vector<float> ToFloat(const Vec& v) { return {v.begin(), v.end()}; }

void ExpectClose(const std::vector<float>& got, const Vec& want,
                 const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], 2e-5 * std::max(1.0, std::abs(want[i])))
        << what << "[" << i << "]";
  }
}

TEST(LayersTest, Fp32NormsAndCrossEntropyAreTheFp64Functions) {
  // Row lengths around the kernels' 16 lanes, tails included.
  std::mt19937 rng(23);
  for (int d : {1, 15, 16, 37, 128}) {
    const int n = 5;
    const Vec x = Random(rng, n * d), g = Random(rng, d),
              dy = Random(rng, n * d);
    Vec y(n * d), dx(n * d), dg(d, 0.0);
    RmsNormForward(x.data(), g.data(), n, d, y.data());
    RmsNormBackward(x.data(), g.data(), dy.data(), n, d, dx.data(), dg.data());
    const auto xf = ToFloat(x), gf = ToFloat(g), dyf = ToFloat(dy);
    std::vector<float> yf(n * d), dxf(n * d), dgf(d, 0.0f);
    RmsNormForward(xf.data(), gf.data(), n, d, yf.data());
    RmsNormBackward(xf.data(), gf.data(), dyf.data(), n, d, dxf.data(),
                    dgf.data());
    ExpectClose(yf, y, "rmsnorm y");
    ExpectClose(dxf, dx, "rmsnorm dx");
    ExpectClose(dgf, dg, "rmsnorm dg");
  }
  for (int vocab : {3, 16, 300}) {
    const int n = 7;
    Vec logits = Random(rng, n * vocab, 3.0);
    std::vector<int32_t> targets(n);
    for (int r = 0; r < n; ++r) targets[r] = (r * 31) % vocab;
    Vec dlogits(n * vocab);
    const double loss =
        CrossEntropy(logits.data(), targets.data(), n, vocab, dlogits.data());
    std::vector<float> dlf(n * vocab);
    const float lossf = CrossEntropy(ToFloat(logits).data(), targets.data(), n,
                                     vocab, dlf.data());
    EXPECT_NEAR(lossf, loss, 2e-5 * std::max(1.0, loss)) << "vocab " << vocab;
    ExpectClose(dlf, dlogits, "dlogits");
  }
}

TEST_P(AttentionTest, Fp32IsTheFp64Function) {
  std::mt19937 rng(13);
  const int batch = 3, len = 23, d = 16, heads = 4, n = batch * len;
  const RotaryTable table(len, d / heads);
  const RotaryTable* rotary = GetParam() ? &table : nullptr;
  const Vec x = Random(rng, n * d), wq = Random(rng, d * d, 0.3),
            wk = Random(rng, d * d, 0.3), wv = Random(rng, d * d, 0.3),
            wo = Random(rng, d * d, 0.3), dy = Random(rng, n * d);
  Vec y(n * d), dx(n * d), dwq(d * d, 0.0), dwk(d * d, 0.0), dwv(d * d, 0.0),
      dwo(d * d, 0.0);
  AttentionCache<double> cache;
  AttentionForward(x.data(), wq.data(), wk.data(), wv.data(), wo.data(), batch,
                   len, d, heads, rotary, y.data(), &cache);
  AttentionBackward(x.data(), wq.data(), wk.data(), wv.data(), wo.data(), batch,
                    len, d, heads, rotary, &cache, dy.data(), dx.data(),
                    dwq.data(), dwk.data(), dwv.data(), dwo.data());
  const auto xf = ToFloat(x), wqf = ToFloat(wq), wkf = ToFloat(wk),
             wvf = ToFloat(wv), wof = ToFloat(wo), dyf = ToFloat(dy);
  std::vector<float> yf(n * d), dxf(n * d), dwqf(d * d, 0.0f),
      dwkf(d * d, 0.0f), dwvf(d * d, 0.0f), dwof(d * d, 0.0f);
  AttentionCache<float> cf;
  AttentionForward(xf.data(), wqf.data(), wkf.data(), wvf.data(), wof.data(),
                   batch, len, d, heads, rotary, yf.data(), &cf);
  AttentionBackward(xf.data(), wqf.data(), wkf.data(), wvf.data(), wof.data(),
                    batch, len, d, heads, rotary, &cf, dyf.data(), dxf.data(),
                    dwqf.data(), dwkf.data(), dwvf.data(), dwof.data());
  ExpectClose(yf, y, "y");
  ExpectClose(dxf, dx, "dx");
  ExpectClose(dwqf, dwq, "dwq");
  ExpectClose(dwkf, dwk, "dwk");
  ExpectClose(dwvf, dwv, "dwv");
  ExpectClose(dwof, dwo, "dwo");
}

TEST_P(AttentionTest, EachSequenceOfABatchAttendsOnlyToItself) {
  // A batch computes, for each of its sequences, what that sequence alone
  // gives (the projections are one GEMM over all rows, row by row).
  std::mt19937 rng(19);
  const int batch = 3, len = 6, d = 8, heads = 2, n = batch * len;
  const RotaryTable table(len, d / heads);
  const RotaryTable* rotary = GetParam() ? &table : nullptr;
  const Vec x = Random(rng, n * d), wq = Random(rng, d * d, 0.4),
            wk = Random(rng, d * d, 0.4), wv = Random(rng, d * d, 0.4),
            wo = Random(rng, d * d, 0.4);
  Vec y(n * d);
  AttentionCache<double> cache;
  AttentionForward(x.data(), wq.data(), wk.data(), wv.data(), wo.data(), batch,
                   len, d, heads, rotary, y.data(), &cache);
  for (int b = 0; b < batch; ++b) {
    Vec alone(len * d);
    AttentionCache<double> c1;
    AttentionForward(x.data() + b * len * d, wq.data(), wk.data(), wv.data(),
                     wo.data(), 1, len, d, heads, rotary, alone.data(), &c1);
    for (int i = 0; i < len * d; ++i) {
      EXPECT_EQ(alone[i], y[b * len * d + i]) << "sequence " << b;
    }
  }
}

TEST(LayersTest, EmbeddingGradients) {
  std::mt19937 rng(6);
  const int len = 5, d = 3, vocab = 4;
  std::vector<int32_t> tokens = {2, 0, 2, 3, 2};  // Repeats accumulate.
  Vec tok = Random(rng, vocab * d), pos = Random(rng, len * d),
      r = Random(rng, len * d);
  auto loss = [&] {
    Vec y(len * d);
    EmbedForward(tokens.data(), len, d, tok.data(), pos.data(), y.data());
    return Dot(y, r);
  };
  Vec dtok(vocab * d, 0.0), dpos(len * d, 0.0);
  EmbedBackward(tokens.data(), len, d, r.data(), dtok.data(), dpos.data());
  ExpectGrad(&tok, dtok, loss, "dtok");
  ExpectGrad(&pos, dpos, loss, "dpos");
  // Without learned positions the embedding is the token row.
  Vec y(len * d);
  EmbedForward<double>(tokens.data(), len, d, tok.data(), nullptr, y.data());
  EXPECT_EQ(y[0], tok[2 * d]);
}

class FfnTest : public ::testing::TestWithParam<int> {};

TEST_P(FfnTest, GradientsForEachActivation) {
  const int act = GetParam();
  const int g = act == 2 ? 2 : 1;
  std::mt19937 rng(7 + act);
  const int n = 4, d = 5, f = 6;
  Vec x = Random(rng, n * d), w1 = Random(rng, d * g * f, 0.5),
      b1 = Random(rng, g * f, 0.3), w2 = Random(rng, f * d, 0.5),
      b2 = Random(rng, d, 0.3), r = Random(rng, n * d);
  auto loss = [&] {
    Vec y(n * d);
    FfnCache<double> cache;
    FfnForward(x.data(), w1.data(), b1.data(), w2.data(), b2.data(), n, d, f,
               act, y.data(), &cache);
    return Dot(y, r);
  };
  Vec y(n * d), dx(n * d), dw1(d * g * f, 0.0), db1(g * f, 0.0),
      dw2(f * d, 0.0), db2(d, 0.0);
  FfnCache<double> cache;
  FfnForward(x.data(), w1.data(), b1.data(), w2.data(), b2.data(), n, d, f, act,
             y.data(), &cache);
  FfnBackward(x.data(), w1.data(), w2.data(), n, d, f, act, &cache, r.data(),
              dx.data(), dw1.data(), db1.data(), dw2.data(), db2.data());
  ExpectGrad(&x, dx, loss, "dx");
  ExpectGrad(&w1, dw1, loss, "dw1");
  ExpectGrad(&b1, db1, loss, "db1");
  ExpectGrad(&w2, dw2, loss, "dw2");
  ExpectGrad(&b2, db2, loss, "db2");
}

std::string ActivationName(const ::testing::TestParamInfo<int>& info) {
  static const char* kNames[] = {"gelu", "relu", "swiglu"};
  return kNames[info.param];
}

TEST_P(FfnTest, Fp32IsTheFp64Function) {
  const int act = GetParam();
  const int g = act == 2 ? 2 : 1;
  std::mt19937 rng(17 + act);
  const int n = 37, d = 16, f = 24;
  const Vec x = Random(rng, n * d), w1 = Random(rng, d * g * f, 0.3),
            b1 = Random(rng, g * f, 0.2), w2 = Random(rng, f * d, 0.3),
            b2 = Random(rng, d, 0.2), dy = Random(rng, n * d);
  Vec y(n * d), dx(n * d), dw1(d * g * f, 0.0), db1(g * f, 0.0),
      dw2(f * d, 0.0), db2(d, 0.0);
  FfnCache<double> cache;
  FfnForward(x.data(), w1.data(), b1.data(), w2.data(), b2.data(), n, d, f, act,
             y.data(), &cache);
  FfnBackward(x.data(), w1.data(), w2.data(), n, d, f, act, &cache, dy.data(),
              dx.data(), dw1.data(), db1.data(), dw2.data(), db2.data());
  const auto xf = ToFloat(x), w1f = ToFloat(w1), b1f = ToFloat(b1),
             w2f = ToFloat(w2), b2f = ToFloat(b2), dyf = ToFloat(dy);
  std::vector<float> yf(n * d), dxf(n * d), dw1f(d * g * f, 0.0f),
      db1f(g * f, 0.0f), dw2f(f * d, 0.0f), db2f(d, 0.0f);
  FfnCache<float> cf;
  FfnForward(xf.data(), w1f.data(), b1f.data(), w2f.data(), b2f.data(), n, d, f,
             act, yf.data(), &cf);
  FfnBackward(xf.data(), w1f.data(), w2f.data(), n, d, f, act, &cf, dyf.data(),
              dxf.data(), dw1f.data(), db1f.data(), dw2f.data(), db2f.data());
  ExpectClose(yf, y, "y");
  ExpectClose(dxf, dx, "dx");
  ExpectClose(dw1f, dw1, "dw1");
  ExpectClose(db1f, db1, "db1");
  ExpectClose(dw2f, dw2, "dw2");
  ExpectClose(db2f, db2, "db2");
}

INSTANTIATE_TEST_SUITE_P(Activations, FfnTest, ::testing::Values(0, 1, 2),
                         ActivationName);

TEST(LayersTest, FfnIsTheExpertFunction) {
  // The reference FFN and the workers' ExpertFfn compute the same function
  // (to float rounding), for every activation.
  for (int act : {0, 1, 2}) {
    const int g = act == 2 ? 2 : 1, n = 5, d = 8, f = 12;
    std::mt19937 rng(30 + act);
    Vec x = Random(rng, n * d), w1 = Random(rng, d * g * f, 0.4),
        b1 = Random(rng, g * f, 0.2), w2 = Random(rng, f * d, 0.4),
        b2 = Random(rng, d, 0.2);
    Vec y(n * d);
    FfnCache<double> cache;
    FfnForward(x.data(), w1.data(), b1.data(), w2.data(), b2.data(), n, d, f,
               act, y.data(), &cache);
    expert_worker::ExpertShape shape;
    shape.d_model = d;
    shape.d_ff_shard = f;
    shape.activation = static_cast<expert_worker::Activation>(act);
    auto to_tensor = [](const Vec& v, std::vector<int64_t> dims) {
      Tensor t = Tensor::Zeros(DType::kF32, dims).value();
      for (size_t i = 0; i < v.size(); ++i)
        t.f32()[i] = static_cast<float>(v[i]);
      return t;
    };
    expert_worker::ExpertParams p;
    p.w1 = to_tensor(w1, {d, g * f});
    p.b1 = to_tensor(b1, {g * f});
    p.w2 = to_tensor(w2, {f, d});
    p.b2 = to_tensor(b2, {d});
    auto gemm = expert_worker::NewCpuGemm(1);
    expert_worker::ExpertFfn ffn(shape, gemm.get());
    Tensor h = Tensor::Zeros(DType::kF32, {n, g * f}).value();
    Tensor ye = Tensor::Zeros(DType::kF32, {n, d}).value();
    ASSERT_TRUE(ffn.Forward(p, to_tensor(x, {n, d}), &h, &ye).ok());
    for (int i = 0; i < n * d; ++i) {
      EXPECT_NEAR(ye.f32()[i], y[i], 1e-4 * std::max(1.0, std::abs(y[i])))
          << "activation " << act << " element " << i;
    }
    // In fp32 the dense layer runs the expert's kernels: the same bits.
    std::vector<float> yf(n * d);
    FfnCache<float> cf;
    const Tensor xt = to_tensor(x, {n, d});
    FfnForward(xt.f32(), p.w1.f32(), p.b1.f32(), p.w2.f32(), p.b2.f32(), n, d,
               f, act, yf.data(), &cf);
    for (int i = 0; i < n * d; ++i) {
      EXPECT_EQ(yf[i], ye.f32()[i]) << "activation " << act << " element " << i;
    }
  }
}

}  // namespace
}  // namespace switchyard::trainer
