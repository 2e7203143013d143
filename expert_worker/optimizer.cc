#include "expert_worker/optimizer.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

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

// Adafactor's scale of one gradient element: g / sqrt(r_i c_j / mean(r)).
inline float FactoredUpdate(float g, float r, float c, float inv_r_mean) {
  const float vhat = r * c * inv_r_mean;
  return g / std::sqrt(vhat);
}

// Adafactor's sums over a stretch of a row run in kSumLanes double lanes
// (element k of the stretch to lane k % kSumLanes), added in a fixed tree:
// the same bits from every build of the loop and every thread count.
constexpr int kSumLanes = 8;

inline double AddLanes(double* lanes) {
  for (int w = kSumLanes / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  }
  return lanes[0];
}

// sum of g^2 + eps over g[0, n).
SY_TARGET_CLONES double SquaresPlusEps(const float* __restrict g, int64_t n,
                                       float eps) {
  double lanes[kSumLanes] = {};
  int64_t k = 0;
  for (; k + kSumLanes <= n; k += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) {
      const float g2 = g[k + l] * g[k + l] + eps;
      lanes[l] += g2;
    }
  }
  for (; k < n; ++k) {
    const float g2 = g[k] * g[k] + eps;
    lanes[k % kSumLanes] += g2;
  }
  return AddLanes(lanes);
}

// sum of u^2 over a row stretch, u = FactoredUpdate(g[k], r, c[k], inv).
SY_TARGET_CLONES double FactoredSquares(const float* __restrict g, float r,
                                        const float* __restrict c,
                                        float inv_r_mean, int64_t n) {
  double lanes[kSumLanes] = {};
  int64_t k = 0;
  for (; k + kSumLanes <= n; k += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) {
      const float u = FactoredUpdate(g[k + l], r, c[k + l], inv_r_mean);
      lanes[l] += static_cast<double>(u) * u;
    }
  }
  for (; k < n; ++k) {
    const float u = FactoredUpdate(g[k], r, c[k], inv_r_mean);
    lanes[k % kSumLanes] += static_cast<double>(u) * u;
  }
  return AddLanes(lanes);
}

// p -= lr (u clip + wd p) over a row stretch.
SY_TARGET_CLONES void FactoredStep(const float* __restrict g, float r,
                                   const float* __restrict c, float inv_r_mean,
                                   float lr, float clip, float wd,
                                   float* __restrict p, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const float u = FactoredUpdate(g[k], r, c[k], inv_r_mean);
    p[k] -= lr * (u * clip + wd * p[k]);
  }
}

// Column sums of g^2 + eps over rows, columns [from, to): sums[j] gets the
// rows in order.
SY_TARGET_CLONES void AddColumnSquares(const float* __restrict g, int64_t rows,
                                       int64_t cols, int64_t from, int64_t to,
                                       float eps, double* __restrict sums) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* gi = g + i * cols;
    for (int64_t j = from; j < to; ++j) {
      const float g2 = gi[j] * gi[j] + eps;
      sums[j] += g2;
    }
  }
}

// Full second moments over v[0, n): v = b2 v + (1 - b2)(g^2 + eps); returns
// the sum of u^2, u = g / sqrt(v).
SY_TARGET_CLONES double FullMoments(const float* __restrict g, float b2,
                                    float eps, float* __restrict v, int64_t n) {
  double lanes[kSumLanes] = {};
  for (int64_t k = 0; k < n; ++k) {
    v[k] = b2 * v[k] + (1.0f - b2) * (g[k] * g[k] + eps);
    const float u = g[k] / std::sqrt(v[k]);
    lanes[k % kSumLanes] += static_cast<double>(u) * u;
  }
  return AddLanes(lanes);
}

// p -= lr (u clip + wd p), u = g / sqrt(v), over [0, n).
SY_TARGET_CLONES void FullStep(const float* __restrict g,
                               const float* __restrict v, float lr, float clip,
                               float wd, float* __restrict p, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const float u = g[k] / std::sqrt(v[k]);
    p[k] -= lr * (u * clip + wd * p[k]);
  }
}

// Columns a thread sums at a time in Adafactor's column pass, and the
// columns of a row tile in its row passes.
constexpr int64_t kColumnBlock = 256;
constexpr int64_t kRowTile = 4096;

// Adafactor's passes over the gradient run on the kernel threads, split by
// rows (or, for column sums, by column blocks; for vectors, by blocks of
// kAdamWBlock), and every sum keeps one order whatever the thread count:
// a row's or a column's elements in index order, then the rows' (blocks')
// partial sums in order. The last pass updates the parameters and writes
// their bf16 rounding; the update itself is recomputed there rather than
// kept.
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
    const float lr = static_cast<float>(LearningRate(t_, step));
    const float b2 =
        static_cast<float>(1.0 - std::pow(static_cast<double>(step + 1), -0.8));
    const float wd = static_cast<float>(t_.weight_decay());
    const int64_t n = param->num_elements();
    if (param->rank() == 2) {
      Factored(param->dim(0), param->dim(1), lr, b2, wd, grad.f32(),
               param->f32(), state->row.f32(), state->col.f32(), p16);
    } else {
      Full(n, lr, b2, wd, grad.f32(), param->f32(), state->v.f32(), p16);
    }
    return OkStatus();
  }

 private:
  static constexpr float kEps = 1e-30f;

  // The factored second moments of a (rows, cols) parameter. Row passes
  // go by tiles of a row (kRowTile columns), so that a (1, n) dense shard
  // is split too; a row's sum is its tiles' partial sums in order.
  void Factored(int64_t rows, int64_t cols, float lr, float b2, float wd,
                const float* g, float* p, float* r, float* c,
                BFloat16* p16) const {
    const bool parallel = rows * cols > kParallelElements;
    const int64_t tiles_per_row = (cols + kRowTile - 1) / kRowTile;
    const int64_t tiles = rows * tiles_per_row;
    std::vector<double>& partial = partial_;
    partial.assign(tiles, 0.0);
    // Row means of g^2 + eps.
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t i = t / tiles_per_row,
                    from = (t % tiles_per_row) * kRowTile;
      const int64_t to = std::min(cols, from + kRowTile);
      partial[t] = SquaresPlusEps(g + i * cols + from, to - from, kEps);
    }
    for (int64_t i = 0; i < rows; ++i) {
      double row_sum = 0;
      for (int64_t k = 0; k < tiles_per_row; ++k) {
        row_sum += partial[i * tiles_per_row + k];
      }
      r[i] = b2 * r[i] + (1.0f - b2) * static_cast<float>(row_sum / cols);
    }
    // Column means, a block of columns per thread, rows in order.
    std::vector<double>& col_sums = col_sums_;
    col_sums.assign(cols, 0.0);
    double* sums = col_sums.data();
    const int64_t col_blocks = (cols + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t b = 0; b < col_blocks; ++b) {
      const int64_t from = b * kColumnBlock;
      AddColumnSquares(g, rows, cols, from, std::min(cols, from + kColumnBlock),
                       kEps, sums);
    }
    double r_mean = 0;
    for (int64_t i = 0; i < rows; ++i) r_mean += r[i];
    r_mean /= rows;
    for (int64_t j = 0; j < cols; ++j) {
      c[j] = b2 * c[j] + (1.0f - b2) * static_cast<float>(sums[j] / rows);
    }
    const float inv_r_mean = static_cast<float>(1.0 / r_mean);
    // The update's RMS: the tiles' sums of squares, in order.
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t i = t / tiles_per_row,
                    from = (t % tiles_per_row) * kRowTile;
      const int64_t to = std::min(cols, from + kRowTile);
      partial[t] = FactoredSquares(g + i * cols + from, r[i], c + from,
                                   inv_r_mean, to - from);
    }
    const float clip = Clip(partial, rows * cols);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t i = t / tiles_per_row,
                    from = (t % tiles_per_row) * kRowTile;
      const int64_t to = std::min(cols, from + kRowTile);
      float* pi = p + i * cols + from;
      FactoredStep(g + i * cols + from, r[i], c + from, inv_r_mean, lr, clip,
                   wd, pi, to - from);
      if (p16 != nullptr) FloatsToBf16(pi, to - from, p16 + i * cols + from);
    }
  }

  // Full second moments (vectors).
  void Full(int64_t n, float lr, float b2, float wd, const float* g, float* p,
            float* v, BFloat16* p16) const {
    const bool parallel = n > kParallelElements;
    const int64_t blocks = (n + kAdamWBlock - 1) / kAdamWBlock;
    std::vector<double>& partial = partial_;
    partial.assign(blocks, 0.0);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t from = b * kAdamWBlock;
      partial[b] = FullMoments(g + from, b2, kEps, v + from,
                               std::min(n, from + kAdamWBlock) - from);
    }
    const float clip = Clip(partial, n);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t from = b * kAdamWBlock;
      const int64_t to = std::min(n, from + kAdamWBlock);
      FullStep(g + from, v + from, lr, clip, wd, p + from, to - from);
      if (p16 != nullptr) FloatsToBf16(p + from, to - from, p16 + from);
    }
  }

  // 1 / max(1, RMS) of an update whose squares sum to the partials (summed
  // in order) over n elements.
  static float Clip(const std::vector<double>& partial, int64_t n) {
    double sum_sq = 0;
    for (double s : partial) sum_sq += s;
    const double rms = std::sqrt(sum_sq / std::max<int64_t>(n, 1));
    return static_cast<float>(1.0 / std::max(1.0, rms));
  }

  const config::TrainingConfig t_;
  // Reused between calls (one thread applies at a time).
  mutable std::vector<double> col_sums_;
  mutable std::vector<double> partial_;
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
