// One expert shard's feed-forward slice: y = act(x W1 + b1) W2 (+ b2).
//
// Shapes (T tokens, d = d_model, f = d_ff / shards_per_expert, g = 2 for
// SwiGLU else 1):
//   x: (T, d)   W1: (d, g*f)   b1: (g*f)   h = x W1 + b1: (T, g*f)
//   a = act(h): (T, f)   W2: (f, d)   b2: (d), shard 0 only   y: (T, d)
// For SwiGLU, h = [gate | up] along its columns and a = silu(gate) * up.
// GELU is the tanh approximation (as in GPT-2 and Switch's T5 code), with
// Switchyard's own tanh and exp (cpu/activation_kernels.h).
//
// Shards of one expert sum their y; only shard 0 adds b2. The weight gradient
// is a separate step (AccumulateGrads) so that the worker can apply it in
// trainer-rank order, whatever order the backward requests arrived in; it
// takes a = act(h), which BackwardInput returns from the same pass.
//
// compute_dtype bf16 converts every GEMM operand to bf16 and multiplies with
// Gemm::Bf16Gemm (fp32 accumulation, fp32 results); master weights,
// gradients and activations stay fp32. Thread-compatible.
#ifndef SWITCHYARD_EXPERT_WORKER_EXPERT_FFN_H_
#define SWITCHYARD_EXPERT_WORKER_EXPERT_FFN_H_

#include <string>

#include "common/status.h"
#include "common/tensor.h"
#include "expert_worker/cpu/activation_kernels.h"
#include "expert_worker/gemm.h"

namespace switchyard::expert_worker {

StatusOr<Activation> ParseActivation(const std::string& name);

struct ExpertShape {
  int d_model = 0;
  int d_ff_shard = 0;  // f
  Activation activation = Activation::kGelu;
  bool has_b1 = true;
  bool has_b2 = true;  // Shard 0 with expert_bias.
  DType compute_dtype = DType::kF32;
  int gates() const { return activation == Activation::kSwiglu ? 2 : 1; }
  // Elements of w1, b1, w2 and b2 together.
  int64_t num_params() const {
    const int64_t gf = static_cast<int64_t>(gates()) * d_ff_shard;
    return d_model * gf + int64_t{d_ff_shard} * d_model + (has_b1 ? gf : 0) +
           (has_b2 ? d_model : 0);
  }
};

// fp32 tensors; b1/b2 are empty when the shape has none.
struct ExpertParams {
  Tensor w1, b1, w2, b2;
  // Optional bf16 copies of w1 and w2 for bf16 compute (FloatToBf16 of every
  // element). NOTE: whoever changes w1/w2 must call RefreshBf16() or clear
  // them; when empty, each product converts the weights itself. A replica's
  // copy of a shard computing in bf16 holds only these, w1 and w2 empty
  // (docs/replication.md): it never updates the weights.
  Tensor w1_bf16, w2_bf16;

  // Zero-filled tensors of `shape`'s sizes; with `weights` bf16, w1 and w2
  // in w1_bf16 and w2_bf16 alone (a replica's copy).
  static StatusOr<ExpertParams> Zeros(const ExpertShape& shape,
                                      DType weights = DType::kF32);
  // (Re)computes w1_bf16 and w2_bf16 from w1 and w2.
  Status RefreshBf16();
  // Gives w1_bf16 and w2_bf16 storage shaped like w1 and w2 (kept when it
  // is), for a writer that fills them itself (the optimizer's sweep).
  Status MakeBf16Storage();
};

class ExpertFfn {
 public:
  ExpertFfn(ExpertShape shape, Gemm* gemm) : shape_(shape), gemm_(gemm) {}

  const ExpertShape& shape() const { return shape_; }

  // x: (T, d) fp32. Writes h: (T, g*f) and y: (T, d), both fp32 and sized by
  // the caller. T = 0 is valid and costs nothing.
  Status Forward(const ExpertParams& p, const Tensor& x, Tensor* h,
                 Tensor* y) const;

  // dy: (T, d). Writes dh: (T, g*f) and a = act(h): (T, f) (both kept for
  // AccumulateGrads) and dx: (T, d).
  Status BackwardInput(const ExpertParams& p, const Tensor& h, const Tensor& dy,
                       Tensor* dh, Tensor* a, Tensor* dx) const;
  // The same with expert dropout: `keep` (T, f) multiplies a = act(h), 0 for
  // a dropped unit and 1 / (1 - rate) for a kept one (null: no dropout).
  // BackwardInput must get the Forward's keep; the a it returns is the
  // dropped one, as AccumulateGrads needs.
  Status Forward(const ExpertParams& p, const Tensor& x, const float* keep,
                 Tensor* h, Tensor* y) const;
  Status BackwardInput(const ExpertParams& p, const Tensor& h, const Tensor& dy,
                       const float* keep, Tensor* dh, Tensor* a,
                       Tensor* dx) const;

  // grads += the weight gradients of one batch: dW1 += x^T dh,
  // db1 += sum(dh), dW2 += a^T dy, db2 += sum(dy). Calls for several
  // batches must come in a fixed order for reproducible sums.
  Status AccumulateGrads(const Tensor& x, const Tensor& a, const Tensor& dh,
                         const Tensor& dy, ExpertParams* grads) const;
  // The same, overwriting grads instead of adding to them (no pass to zero
  // them first).
  Status ComputeGrads(const Tensor& x, const Tensor& a, const Tensor& dh,
                      const Tensor& dy, ExpertParams* grads) const;

 private:
  // `p` shaped for this expert (with `bf16_weights`, for bf16 compute, w1
  // and w2 may be in their bf16 copies alone: what the products read) and
  // x (tokens, d_model).
  Status CheckShapes(const ExpertParams& p, const Tensor& x, int64_t tokens,
                     bool bf16_weights = false) const;
  Status Grads(const Tensor& x, const Tensor& a, const Tensor& dh,
               const Tensor& dy, bool accumulate, ExpertParams* grads) const;

  ExpertShape shape_;
  Gemm* gemm_;  // Not owned.
};

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_EXPERT_FFN_H_
