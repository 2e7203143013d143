// The activation kernels on their own: Switchyard's tanh approximation
// against fp64, over the whole float range, and the same bits for the same
// input wherever it sits in a row (vector body or tail, any thread).
#include "expert_worker/cpu/activation_kernels.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace switchyard::expert_worker {
namespace {

constexpr double kGeluC = 0.7978845608028654;  // sqrt(2 / pi)

double RefGelu(double x) {
  return 0.5 * x * (1 + std::tanh(kGeluC * (x + 0.044715 * x * x * x)));
}

double RefGeluGrad(double x) {
  const double u = kGeluC * (x + 0.044715 * x * x * x);
  const double t = std::tanh(u);
  return 0.5 * (1 + t) +
         0.5 * x * (1 - t * t) * kGeluC * (1 + 3 * 0.044715 * x * x);
}

double RefSilu(double g) { return g / (1 + std::exp(-g)); }

// Inputs spread over every binade of the float range, both signs, and the
// values where tanh saturates.
std::vector<float> Inputs() {
  std::vector<float> v;
  for (uint32_t bits = 0; bits < 0x7f800000u; bits += 4099) {
    float x;
    std::memcpy(&x, &bits, sizeof(x));
    if (std::fabs(x) > 1e4f) continue;  // x^3 overflows GELU's core.
    v.push_back(x);
    v.push_back(-x);
  }
  return v;
}

// GELU's tanh: its absolute error in tanh is 3.6e-7, so GELU's is about
// |x| * 1.8e-7 (plus rounding); the gradient's likewise.
TEST(ActivationKernelsTest, GeluWithinItsStatedErrorEverywhere) {
  const std::vector<float> x = Inputs();
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<float> h = x, a(n), dh(n), a2(n);
  const std::vector<float> ones(n, 1.0f);
  ActivationForward(Activation::kGelu, h.data(), nullptr, 1, n, a.data());
  ActivationBackward(Activation::kGelu, x.data(), ones.data(), 1, n, dh.data(),
                     a2.data());
  double worst = 0, worst_grad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double tol = 4e-7 * (1 + std::fabs(x[i]));
    worst = std::max(worst, std::fabs(a[i] - RefGelu(x[i])) / tol);
    worst_grad =
        std::max(worst_grad, std::fabs(dh[i] - RefGeluGrad(x[i])) / (2 * tol));
    ASSERT_EQ(std::memcmp(&a[i], &a2[i], sizeof(float)), 0)
        << "forward and backward differ at " << x[i];
  }
  EXPECT_LE(worst, 1.0) << "GELU error over its bound (as a fraction)";
  EXPECT_LE(worst_grad, 1.0) << "GELU gradient error over its bound";
}

TEST(ActivationKernelsTest, SwigluWithinItsStatedError) {
  const std::vector<float> x = Inputs();
  const int64_t n = static_cast<int64_t>(x.size());
  // One row: gates then ups (all 1.5).
  std::vector<float> h(2 * n, 1.5f);
  std::copy(x.begin(), x.end(), h.begin());
  std::vector<float> a(n);
  ActivationForward(Activation::kSwiglu, h.data(), nullptr, 1, n, a.data());
  for (int64_t i = 0; i < n; ++i) {
    const double want = 1.5 * RefSilu(x[i]);
    ASSERT_NEAR(a[i], want, 1e-6 * (1 + std::fabs(want))) << "gate " << x[i];
  }
}

// A diverged input never comes out as a plausible number: NaN stays NaN,
// +inf gives +inf, and -inf a non-finite value.
TEST(ActivationKernelsTest, NonFiniteInputs) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> gelu_in = {nan, inf, -inf}, gelu_out(3);
  ActivationForward(Activation::kGelu, gelu_in.data(), nullptr, 1, 3,
                    gelu_out.data());
  EXPECT_TRUE(std::isnan(gelu_out[0]));
  EXPECT_EQ(gelu_out[1], inf);
  EXPECT_TRUE(std::isnan(gelu_out[2])) << "-inf * 0, as with tanhf";
  // SwiGLU gates NaN, +inf, -inf, each with up 2.
  std::vector<float> swiglu_in = {nan, inf, -inf, 2.0f, 2.0f, 2.0f};
  std::vector<float> swiglu_out(3);
  ActivationForward(Activation::kSwiglu, swiglu_in.data(), nullptr, 1, 3,
                    swiglu_out.data());
  EXPECT_TRUE(std::isnan(swiglu_out[0]));
  EXPECT_EQ(swiglu_out[1], inf);
  EXPECT_FALSE(std::isfinite(swiglu_out[2]));
}

// Every position of a row computes the same bits for the same input:
// vector bodies, tails and the threads that take other rows alike.
TEST(ActivationKernelsTest, SameInputSameBitsAtEveryPosition) {
  const std::vector<float> values = {-7.5f, -1.25f, -3e-4f, 0.0f,
                                     1e-5f, 0.7f,   2.5f,   9.0f};
  for (Activation act :
       {Activation::kGelu, Activation::kSwiglu, Activation::kRelu}) {
    for (int64_t f : {1, 7, 37, 100}) {
      const int64_t tokens = 700;  // Enough to be split over threads.
      const int64_t width = act == Activation::kSwiglu ? 2 * f : f;
      for (float v : values) {
        std::vector<float> h(tokens * width, v), a(tokens * f);
        std::vector<float> da(tokens * f, 0.5f), dh(tokens * width);
        std::vector<float> a2(tokens * f);
        ActivationForward(act, h.data(), nullptr, tokens, f, a.data());
        ActivationBackward(act, h.data(), da.data(), tokens, f, dh.data(),
                           a2.data());
        for (int64_t i = 1; i < tokens * f; ++i) {
          ASSERT_EQ(std::memcmp(&a[i], &a[0], sizeof(float)), 0)
              << "forward, width " << f << ", value " << v << ", index " << i;
          ASSERT_EQ(std::memcmp(&a2[i], &a[0], sizeof(float)), 0)
              << "backward's a, width " << f << ", value " << v;
        }
        for (int64_t i = 1; i < tokens * width; ++i) {
          const int64_t first =
              act == Activation::kSwiglu && i % width >= f ? f : 0;
          ASSERT_EQ(std::memcmp(&dh[i], &dh[first], sizeof(float)), 0)
              << "backward's dh, width " << f << ", value " << v;
        }
      }
    }
  }
}

}  // namespace
}  // namespace switchyard::expert_worker
