// The MoE router (gate) of one layer, computed in full precision on the
// trainer (Switch's "selective precision").
//
// Shapes: x (T, d), W (d, E) -> logits (T, E) -> probs = softmax(logits).
// Each token picks its top-k experts (ties: the lower index). The combine
// weight (gate) of choice j is probs[e_j] for k = 1 (Switch) and probs[e_j]
// renormalised over the k choices for k > 1 (GLaM). With capacity_factor
// > 0 every expert takes at most C = ceil(capacity_factor * T * k / E)
// assignments, first choices of all tokens before second choices, tokens in
// order; an assignment beyond C is dropped (gate 0: the token keeps its
// residual for that choice). capacity_factor 0 is dropless.
//
// Losses (added to the training loss; their gradients flow into logits):
//   aux = alpha * E * sum_i f_i * P_i   f_i: fraction of tokens whose first
//                                       choice is i; P_i: mean prob of i
//   z   = beta * mean_t logsumexp(logits_t)^2
// Jitter multiplies x elementwise by U(1 - eps, 1 + eps) during training,
// from (seed, step, rank, micro-batch, layer, token, dim).
//
// Templated on the scalar so that gradient checks run in double; training
// uses float. Pure functions; thread-safe.
#ifndef SWITCHYARD_TRAINER_ROUTER_H_
#define SWITCHYARD_TRAINER_ROUTER_H_

#include <cstdint>
#include <vector>

#include "config.pb.h"

namespace switchyard::trainer {

struct RouterOptions {
  int num_experts = 0;
  int top_k = 1;
  double capacity_factor = 0;  // 0: dropless.
  double aux_loss_alpha = 0;
  double z_loss = 0;
  double jitter = 0;
  static RouterOptions FromModel(const config::ModelConfig& model);
  // FromModel with training.eval_capacity_factor as the capacity factor.
  static RouterOptions ForEvaluation(const config::SwitchyardConfig& config);
};

template <typename Real>
struct RouterState {
  int tokens = 0, experts = 0, k = 0;
  std::vector<Real> x;        // (T, d) after jitter: the router's input.
  std::vector<Real> logits;   // (T, E)
  std::vector<Real> probs;    // (T, E)
  std::vector<int> expert;    // (T, k) choices, best first
  std::vector<Real> gate;     // (T, k) combine weights; 0 when dropped
  std::vector<uint8_t> kept;  // (T, k) 1 within capacity
  std::vector<int> first_choice_count;  // (E) tokens whose first choice is e
  std::vector<int> load;                // (E) kept assignments per expert
  int capacity = 0;                     // 0: dropless
  int dropped = 0;                      // assignments beyond capacity
  Real aux_loss = 0;
  Real z_loss = 0;
};

// Multipliers for router jitter: (T, d) values in [1 - eps, 1 + eps].
std::vector<float> JitterMultipliers(uint64_t seed, int64_t step, int rank,
                                     int micro_batch, int layer, int tokens,
                                     int d, double eps);

// Routes x (T, d) with W (d, E). `jitter` is (T, d) multipliers or null.
template <typename Real>
RouterState<Real> RouteForward(const RouterOptions& options, const Real* x,
                               int tokens, int d, const Real* w,
                               const float* jitter);

// Backward from d_gate (T, k) = dLoss/dgate, adding the aux and z losses'
// gradients times `loss_scale` (the factor d_gate already carries). Writes
// dx (T, d) (through the jitter multipliers) and dw (d, E) (overwritten).
template <typename Real>
void RouteBackward(const RouterOptions& options, const RouterState<Real>& s,
                   const Real* d_gate, Real loss_scale, int d, const Real* w,
                   const float* jitter, Real* dx, Real* dw);

}  // namespace switchyard::trainer

#endif  // SWITCHYARD_TRAINER_ROUTER_H_
