// The row kernels of the fp32 dense layers (layers.cc): RMSNorm, attention's
// causal softmax and softmax cross-entropy, forward and backward. Vectorised
// (AVX-512, AVX2 or the baseline, chosen at load time) with the same bits on
// every CPU: sums over a row in fixed lanes, Switchyard's own exp
// (common/vector_math.h). The same functions as the fp64 templates of
// layers.h, to fp32 rounding. Pure functions; thread-safe.
#ifndef SWITCHYARD_TRAINER_ROW_KERNELS_H_
#define SWITCHYARD_TRAINER_ROW_KERNELS_H_

#include <cstdint>

namespace switchyard::trainer::kernels {

// y = x / sqrt(mean(x^2) + eps) * g per row.  x, y: (n, d); g: (d).
void RmsNormForward(const float* x, const float* g, int n, int d, float eps,
                    float* y);
// Overwrites dx; accumulates dg.
void RmsNormBackward(const float* x, const float* g, const float* dy, int n,
                     int d, float eps, float* dx, float* dg);

// Row i of probs (len, len) holds scores: softmax over j <= i in place,
// zeros after.
void CausalSoftmax(float* probs, int len);
// g (len, len) holds dLoss/dP: overwritten with dLoss/dscores times
// `scale`, P_ij (g_ij - sum_j' P_ij' g_ij') * scale for j <= i, 0 after.
void CausalSoftmaxBackward(const float* probs, float* g, int len, float scale);

// Mean softmax cross-entropy of logits (n, vocab) against targets;
// writes dlogits = d(mean loss)/dlogits and returns the mean loss.
float CrossEntropy(const float* logits, const int32_t* targets, int n,
                   int vocab, float* dlogits);

}  // namespace switchyard::trainer::kernels

#endif  // SWITCHYARD_TRAINER_ROW_KERNELS_H_
