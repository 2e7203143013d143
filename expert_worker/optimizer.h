// Optimizers applied by the worker that owns a parameter, and the learning
// rate schedule, a pure function of the step (so no schedule state is saved).
//
// AdamW (Loshchilov & Hutter): bias-corrected moments, decoupled weight decay
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   p -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd * p),  t = step + 1
// Adafactor (Shazeer & Stern 2018, as T5/Switch/GLaM trained): no momentum,
// factored second moments for matrices, decay b2_t = 1 - t^-0.8,
// update clipping at RMS 1, external learning rate, decoupled weight decay:
//   matrices (R, C): r = b2 r + (1-b2) mean_cols(g^2 + 1e-30)   (R)
//                    c = b2 c + (1-b2) mean_rows(g^2 + 1e-30)   (C)
//                    vhat_ij = r_i c_j / mean(r)
//   vectors:         v = b2 v + (1-b2) (g^2 + 1e-30)
//   u = g / sqrt(vhat);  u /= max(1, RMS(u));  p -= lr * (u + wd * p)
// Elementwise in a fixed order, so results are bit-reproducible. AdamW's
// sweep runs on the calling thread's OpenMP threads (SetKernelThreads):
// every element is computed on its own, so the bits do not depend on the
// thread count. Thread-compatible.
#ifndef SWITCHYARD_EXPERT_WORKER_OPTIMIZER_H_
#define SWITCHYARD_EXPERT_WORKER_OPTIMIZER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"
#include "config.pb.h"

namespace switchyard::expert_worker {

// Learning rate at `step` (0-based): linear warmup over warmup_steps to
// learning_rate, then constant, cosine decay to 0 at training.steps, or
// inverse square root (lr * sqrt(warmup / max(step + 1, warmup))).
double LearningRate(const config::TrainingConfig& training, int64_t step);

// Optimizer state of one parameter tensor (fp32). AdamW: m and v, shaped like
// the parameter. Adafactor: row (R) and col (C) for a matrix (R, C), or v
// for a vector.
struct OptimizerState {
  Tensor m, v, row, col;
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  static StatusOr<std::unique_ptr<Optimizer>> Create(
      const config::TrainingConfig& training);

  // Zero state for `param` (rank 1 or 2, fp32).
  virtual StatusOr<OptimizerState> NewState(const Tensor& param) const = 0;
  // One update at `step` (0-based) with `grad` (fp32, same shape as param).
  // With `param_bf16` (bf16, shaped like param), the same sweep also writes
  // the updated parameters rounded to bf16 there (what RefreshBf16 would
  // write, without a second pass over them).
  virtual Status Apply(int64_t step, const Tensor& grad, Tensor* param,
                       OptimizerState* state,
                       Tensor* param_bf16 = nullptr) const = 0;
};

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_OPTIMIZER_H_
