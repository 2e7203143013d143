#include "expert_worker/optimizer.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "common/bf16.h"
#include "common/target_clones.h"

namespace switchyard::expert_worker {

double LearningRate(const config::TrainingConfig& t, int64_t step) {
  const double peak = t.learning_rate();
  const int64_t warmup = t.warmup_steps();
  if (step < warmup) return peak * static_cast<double>(step + 1) / warmup;
  if (t.lr_schedule() == "cosine") {
    const int64_t span = std::max<int64_t>(1, t.steps() - warmup);
    const double progress =
        std::clamp(static_cast<double>(step - warmup) / span, 0.0, 1.0);
    return peak * 0.5 * (1.0 + std::cos(M_PI * progress));
  }
  if (t.lr_schedule() == "inverse_sqrt") {
    const double w = static_cast<double>(std::max<int64_t>(warmup, 1));
    return peak * std::sqrt(w / std::max<double>(step + 1, w));
  }
  return peak;
}

namespace {

Status CheckPair(const Tensor& grad, const Tensor& param) {
  if (param.dtype() != DType::kF32 || grad.dtype() != DType::kF32 ||
      grad.shape() != param.shape() || param.rank() < 1 || param.rank() > 2) {
    return InvalidArgumentError("optimizer: gradient " + grad.DebugString() +
                                " does not match parameter " +
                                param.DebugString());
  }
  return OkStatus();
}

// Checks a bf16 copy to write beside `param` (none: null).
StatusOr<BFloat16*> Bf16Out(const Tensor& param, Tensor* copy) {
  if (copy == nullptr) return static_cast<BFloat16*>(nullptr);
  if (copy->dtype() != DType::kBF16 || copy->shape() != param.shape()) {
    return InvalidArgumentError("optimizer: bf16 copy " + copy->DebugString() +
                                " does not match parameter " +
                                param.DebugString());
  }
  return copy->bf16();
}

// Elements [from, to) of one AdamW update, and their bf16 rounding when p16
// is not null. Compiled for AVX-512, AVX2 and plain x86-64 and chosen at
// load time; optimizer.cc is built with -ffp-contract=off and
// -fno-math-errno, so every variant vectorises the same IEEE operations (no
// fused multiply-adds) and gives the same bits.
SY_TARGET_CLONES void AdamWRange(int64_t from, int64_t to, float lr, float b1,
                                 float b2, float c1, float c2, float eps,
                                 float wd, const float* __restrict g,
                                 float* __restrict p, float* __restrict m,
                                 float* __restrict v,
                                 BFloat16* __restrict p16) {
  for (int64_t i = from; i < to; ++i) {
    m[i] = b1 * m[i] + (1.0f - b1) * g[i];
    v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
    const float update = (m[i] * c1) / (std::sqrt(v[i] * c2) + eps);
    p[i] -= lr * (update + wd * p[i]);
  }
  if (p16 != nullptr) FloatsToBf16(p + from, to - from, p16 + from);
}

// Elements a thread updates at a time (64 KiB of each array: the block's
// parameters are still in cache for their bf16 rounding), and below how
// many the sweep stays on the calling thread.
constexpr int64_t kAdamWBlock = 16384;
constexpr int64_t kParallelElements = 65536;

class AdamW : public Optimizer {
 public:
  explicit AdamW(const config::TrainingConfig& t) : t_(t) {}

  StatusOr<OptimizerState> NewState(const Tensor& param) const override {
    OptimizerState s;
    ASSIGN_OR_RETURN(s.m, Tensor::Zeros(DType::kF32, param.shape()));
    ASSIGN_OR_RETURN(s.v, Tensor::Zeros(DType::kF32, param.shape()));
    return s;
  }

  Status Apply(int64_t step, const Tensor& grad, Tensor* param,
               OptimizerState* state, Tensor* param_bf16) const override {
    RETURN_IF_ERROR(CheckPair(grad, *param));
    ASSIGN_OR_RETURN(BFloat16* const p16, Bf16Out(*param, param_bf16));
    const double t = static_cast<double>(step + 1);
    const float lr = static_cast<float>(LearningRate(t_, step));
    const float b1 = static_cast<float>(t_.beta1());
    const float b2 = static_cast<float>(t_.beta2());
    const float c1 = static_cast<float>(1.0 / (1.0 - std::pow(t_.beta1(), t)));
    const float c2 = static_cast<float>(1.0 / (1.0 - std::pow(t_.beta2(), t)));
    const float eps = static_cast<float>(t_.eps());
    const float wd = static_cast<float>(t_.weight_decay());
    const int64_t n = param->num_elements();
    const int64_t blocks = (n + kAdamWBlock - 1) / kAdamWBlock;
    const float* g = grad.f32();
    float* p = param->f32();
    float* m = state->m.f32();
    float* v = state->v.f32();
#pragma omp parallel for schedule(static) if (n > kParallelElements)
    for (int64_t b = 0; b < blocks; ++b) {
      AdamWRange(b * kAdamWBlock, std::min(n, (b + 1) * kAdamWBlock), lr, b1,
                 b2, c1, c2, eps, wd, g, p, m, v, p16);
    }
    return OkStatus();
  }

 private:
  const config::TrainingConfig t_;
};

class Adafactor : public Optimizer {
 public:
  explicit Adafactor(const config::TrainingConfig& t) : t_(t) {}

  StatusOr<OptimizerState> NewState(const Tensor& param) const override {
    OptimizerState s;
    if (param.rank() == 2) {
      ASSIGN_OR_RETURN(s.row, Tensor::Zeros(DType::kF32, {param.dim(0)}));
      ASSIGN_OR_RETURN(s.col, Tensor::Zeros(DType::kF32, {param.dim(1)}));
    } else {
      ASSIGN_OR_RETURN(s.v, Tensor::Zeros(DType::kF32, param.shape()));
    }
    return s;
  }

  Status Apply(int64_t step, const Tensor& grad, Tensor* param,
               OptimizerState* state, Tensor* param_bf16) const override {
    RETURN_IF_ERROR(CheckPair(grad, *param));
    ASSIGN_OR_RETURN(BFloat16* const p16, Bf16Out(*param, param_bf16));
    constexpr float kEps = 1e-30f;
    const float lr = static_cast<float>(LearningRate(t_, step));
    const float b2 =
        static_cast<float>(1.0 - std::pow(static_cast<double>(step + 1), -0.8));
    const float wd = static_cast<float>(t_.weight_decay());
    const int64_t n = param->num_elements();
    const float* g = grad.f32();
    float* p = param->f32();
    std::vector<float>& u = scratch_;
    u.resize(n);
    if (param->rank() == 2) {
      const int64_t rows = param->dim(0), cols = param->dim(1);
      float* r = state->row.f32();
      float* c = state->col.f32();
      std::vector<double>& col_sums = col_sums_;
      col_sums.assign(cols, 0.0);
      for (int64_t i = 0; i < rows; ++i) {
        double row_sum = 0;
        for (int64_t j = 0; j < cols; ++j) {
          const float g2 = g[i * cols + j] * g[i * cols + j] + kEps;
          row_sum += g2;
          col_sums[j] += g2;
        }
        r[i] = b2 * r[i] + (1.0f - b2) * static_cast<float>(row_sum / cols);
      }
      double r_mean = 0;
      for (int64_t i = 0; i < rows; ++i) r_mean += r[i];
      r_mean /= rows;
      for (int64_t j = 0; j < cols; ++j) {
        c[j] = b2 * c[j] + (1.0f - b2) * static_cast<float>(col_sums[j] / rows);
      }
      const float inv_r_mean = static_cast<float>(1.0 / r_mean);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) {
          const float vhat = r[i] * c[j] * inv_r_mean;
          u[i * cols + j] = g[i * cols + j] / std::sqrt(vhat);
        }
      }
    } else {
      float* v = state->v.f32();
      for (int64_t i = 0; i < n; ++i) {
        v[i] = b2 * v[i] + (1.0f - b2) * (g[i] * g[i] + kEps);
        u[i] = g[i] / std::sqrt(v[i]);
      }
    }
    double sum_sq = 0;
    for (int64_t i = 0; i < n; ++i) sum_sq += static_cast<double>(u[i]) * u[i];
    const double rms = std::sqrt(sum_sq / std::max<int64_t>(n, 1));
    const float clip = static_cast<float>(1.0 / std::max(1.0, rms));
    for (int64_t i = 0; i < n; ++i) p[i] -= lr * (u[i] * clip + wd * p[i]);
    if (p16 != nullptr) FloatsToBf16(p, n, p16);
    return OkStatus();
  }

 private:
  const config::TrainingConfig t_;
  mutable std::vector<float> scratch_;
  mutable std::vector<double> col_sums_;
};

}  // namespace

StatusOr<std::unique_ptr<Optimizer>> Optimizer::Create(
    const config::TrainingConfig& training) {
  if (training.optimizer() == "adamw") {
    return std::unique_ptr<Optimizer>(new AdamW(training));
  }
  if (training.optimizer() == "adafactor") {
    return std::unique_ptr<Optimizer>(new Adafactor(training));
  }
  return InvalidArgumentError("unknown optimizer '" + training.optimizer() +
                              "'");
}

}  // namespace switchyard::expert_worker
