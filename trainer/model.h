// The transformer a trainer runs: the dense part of a decoder-only model with
// explicit forward and backward passes, and the MoE layers' routers; the
// experts themselves are behind MoeExperts (remote workers in training, an
// in-memory implementation in gradient checks).
//
// Per layer l (pre-norm, N = B * L tokens, d = d_model, V = vocab):
//   h  = x + Attention(Norm1(x))                  per sequence, causal
//   x' = h + Ffn(Norm2(h))                        dense layer, or
//   x' = h + sum_j gate_j * Expert_{e_j}(Norm2(h)) MoE layer (router: fp32)
// then logits (N, V) = FinalNorm(x_L) @ lm_head and the loss
//   loss = CrossEntropy(logits, targets) + sum_MoE (aux + z).
// x_0 = tok_embed[tokens] (+ pos_embed[position] for learned positions; with
// rotary positions q and k turn instead). Parameters are the flat DenseLayout
// vector (common/model_shape.h); gradients come back in the same layout.
//
// Randomness (router jitter) derives from (seed, step, rank, micro-batch,
// layer). Deterministic: same inputs and thread count, same bits.
//
// Thread-compatible: a Transformer is driven by one thread.
#ifndef SWITCHYARD_TRAINER_MODEL_H_
#define SWITCHYARD_TRAINER_MODEL_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/model_shape.h"
#include "common/status.h"
#include "config.pb.h"
#include "trainer/data.h"
#include "trainer/layers.h"
#include "trainer/router.h"

namespace switchyard::trainer {

// The experts of every MoE layer, as the model sees them. `layer` is the MoE
// layer ordinal.
template <typename Real>
class MoeExperts {
 public:
  virtual ~MoeExperts() = default;
  // x: (T, d). Writes y (T, d) = sum_j gate_tj * expert_{e_tj}(x_t) over the
  // kept choices. With `train`, keeps what Backward needs.
  virtual Status Forward(int layer, int micro_batch, bool train, const Real* x,
                         const RouterState<Real>& route, Real* y) = 0;
  // dy: (T, d). Overwrites dx (T, d) and d_gate (T, k) = dLoss/dgate.
  virtual Status Backward(int layer, int micro_batch, int tokens,
                          const Real* dy, Real* dx, Real* d_gate) = 0;
};

// Router statistics of one MoE layer for one forward pass.
struct MoeLayerStats {
  std::vector<int> load;  // (E) kept assignments per expert
  int assignments = 0;    // tokens * k
  int dropped = 0;        // beyond capacity
  double aux_loss = 0;
  double z_loss = 0;
};

struct LossReport {
  double loss = 0;                  // Mean cross-entropy (nats per token).
  double aux_loss = 0, z_loss = 0;  // Summed over MoE layers.
  int64_t tokens = 0;
  std::vector<MoeLayerStats> moe;  // Per MoE layer.
};

// Where one randomised forward pass sits in the run.
struct PassId {
  int64_t step = 0;
  int rank = 0;
  int micro_batch = 0;
};

template <typename Real>
class Transformer {
 public:
  // `config` must have passed ValidateConfig.
  explicit Transformer(const config::SwitchyardConfig& config);

  int64_t num_params() const { return num_params_; }
  const std::vector<DenseTensor>& layout() const { return layout_; }

  // Forward and backward of one batch; adds loss_scale * dLoss/dparams to
  // grads (both DenseLayout vectors). Router jitter is on.
  StatusOr<LossReport> TrainStep(const Real* params, const Batch& batch,
                                 const PassId& pass, Real loss_scale,
                                 MoeExperts<Real>* experts, Real* grads);

  // Forward only, no jitter, nothing kept by the experts. Writes the logits
  // (B * L, V) when `logits` is not null.
  StatusOr<LossReport> Evaluate(const Real* params, const Batch& batch,
                                MoeExperts<Real>* experts,
                                std::vector<Real>* logits);

 private:
  struct LayerCache {
    std::vector<Real> x;        // (N, d) layer input
    std::vector<Real> n1;       // (N, d) Norm1(x)
    AttentionCache<Real> attn;  // every sequence of the batch
    std::vector<Real> h;        // (N, d) after attention
    std::vector<Real> n2;       // (N, d) Norm2(h)
    FfnCache<Real> ffn;         // dense layers
    RouterState<Real> route;    // MoE layers
    std::vector<float> jitter;
  };
  // What a pass keeps for its backward, and the workspace of both: kept
  // from pass to pass (cache_), so that a step allocates nothing new.
  struct Cache {
    int batch = 0, len = 0;
    std::vector<LayerCache> layers;
    std::vector<Real> x_final;    // (N, d)
    std::vector<Real> n_final;    // (N, d)
    std::vector<Real> logits;     // (N, V)
    std::vector<Real> block_out;  // (N, d) an attention or FFN block's output
    std::vector<Real> dlogits;    // (N, V)
    std::vector<Real> dn, dx, dn2, dh, dx_router;  // (N, d)
  };

  const RotaryTable* rotary() const {
    return rotary_ ? &rotary_table_ : nullptr;
  }
  const Real* Param(const Real* params, const std::string& name) const;
  Real* Grad(Real* grads, const std::string& name) const;
  void NormForward(const Real* params, const std::string& prefix, const Real* x,
                   int n, Real* y) const;
  void NormBackward(const Real* params, const std::string& prefix,
                    const Real* x, const Real* dy, int n, Real* dx,
                    Real* grads) const;
  Status Forward(const Real* params, const Batch& batch, bool train,
                 const PassId& pass, MoeExperts<Real>* experts, Cache* cache,
                 LossReport* report);

  const config::ModelConfig model_;
  const uint64_t seed_;
  const RouterOptions router_;       // Training passes.
  const RouterOptions eval_router_;  // Evaluate: eval_capacity_factor.
  const int activation_;             // 0 GELU, 1 ReLU, 2 SwiGLU
  const bool rotary_;
  const bool layernorm_;
  const RotaryTable rotary_table_;  // Empty without rotary positions.
  std::vector<DenseTensor> layout_;
  std::map<std::string, int64_t> offset_;  // name -> offset
  int64_t num_params_ = 0;
  Cache cache_;  // Every pass's (one thread drives a Transformer).
};

// 0 GELU, 1 ReLU, 2 SwiGLU: the activation codes of layers.h.
int ActivationCode(const std::string& activation);

}  // namespace switchyard::trainer

#endif  // SWITCHYARD_TRAINER_MODEL_H_
