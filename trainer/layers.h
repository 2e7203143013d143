// Dense layers of the transformer with explicit forward and backward, in the
// spirit of a clean reference implementation (llm.c), templated on the
// scalar so that gradient checks run in double; row-major. Every matrix
// product (attention's per-head scores and weighted sums included) is a
// GEMM: BLAS (sgemm) in fp32, a plain triple loop in fp64. The fp32 FFN's
// activations run on the expert kernels (expert_worker/cpu/
// activation_kernels.h), so a dense FFN and an expert compute the same
// bits; the fp64 ones on libm.
//
// Backward functions accumulate (+=) into parameter gradients and overwrite
// input gradients. Thread-safe for callers with caches of their own (a
// cache also holds its backward's workspace).
#ifndef SWITCHYARD_TRAINER_LAYERS_H_
#define SWITCHYARD_TRAINER_LAYERS_H_

#include <cstdint>
#include <vector>

namespace switchyard::trainer {

constexpr double kNormEps = 1e-5;
// Rotary positions: dimension pair (i, i + 1) of a head of width hd turns by
// position / kRopeTheta^(i / hd).
constexpr double kRopeTheta = 10000.0;

// RMSNorm: y = x / sqrt(mean(x^2) + eps) * g.  x, y: (N, d); g: (d).
template <typename Real>
void RmsNormForward(const Real* x, const Real* g, int n, int d, Real* y);
template <typename Real>
void RmsNormBackward(const Real* x, const Real* g, const Real* dy, int n, int d,
                     Real* dx, Real* dg);

// LayerNorm: y = (x - mean) / sqrt(var + eps) * g + b.
template <typename Real>
void LayerNormForward(const Real* x, const Real* g, const Real* b, int n, int d,
                      Real* y);
template <typename Real>
void LayerNormBackward(const Real* x, const Real* g, const Real* dy, int n,
                       int d, Real* dx, Real* dg, Real* db);

// The angles of rotary position embedding (RoPE) for heads of width
// head_dim and positions below max_len: pair (2i, 2i+1) of position p turns
// by p / 10000^(2i / head_dim). Computed once (a model builds one), not per
// call: the cosines and sines were most of attention's time.
struct RotaryTable {
  RotaryTable() = default;
  RotaryTable(int max_len, int head_dim);
  int max_len = 0, head_dim = 0;
  std::vector<double> cos, sin;  // (max_len, head_dim / 2)
};

// RoPE of rows (L, d) split into heads of hd = table.head_dim (L at most
// table.max_len). `inverse` turns back (the transpose, for backward).
template <typename Real>
void ApplyRotary(Real* rows, int len, int d, int heads,
                 const RotaryTable& table, bool inverse);

// Causal multi-head self-attention over `batch` sequences of `len` tokens
// (rows b*len .. (b+1)*len - 1 of x are sequence b), no biases:
// q, k, v = x Wq, x Wk, x Wv (q and k rotated when `rotary` is not null;
// its head_dim must be d / heads); per sequence and head h (columns
// h*hd .. (h+1)*hd): P = softmax(q_h k_h^T / sqrt(hd)) with position i
// seeing j <= i; y = concat_h(P v_h) Wo.  x, y: (batch * len, d);
// W*: (d, d). The projections are one GEMM over every sequence's rows.
template <typename Real>
struct AttentionCache {
  std::vector<Real> q, k, v;  // (N, d); q and k after rotation
  std::vector<Real> probs;    // (batch, H, L, L)
  std::vector<Real> context;  // (N, d): concat_h(P v_h)
  // The backward's workspace, kept so that a step allocates nothing.
  std::vector<Real> dctx, dq, dk, dv, ds;
};
template <typename Real>
void AttentionForward(const Real* x, const Real* wq, const Real* wk,
                      const Real* wv, const Real* wo, int batch, int len, int d,
                      int heads, const RotaryTable* rotary, Real* y,
                      AttentionCache<Real>* cache);
// Accumulates dW*; overwrites dx (N, d).
template <typename Real>
void AttentionBackward(const Real* x, const Real* wq, const Real* wk,
                       const Real* wv, const Real* wo, int batch, int len,
                       int d, int heads, const RotaryTable* rotary,
                       AttentionCache<Real>* cache, const Real* dy, Real* dx,
                       Real* dwq, Real* dwk, Real* dwv, Real* dwo);

// Token embedding plus learned positions (pos may be null, for rotary):
// y[t] = tok[tokens[t]] + pos[t].  y: (L, d).
template <typename Real>
void EmbedForward(const int32_t* tokens, int len, int d, const Real* tok,
                  const Real* pos, Real* y);
// Scatter-adds dy into dtok (rows of the tokens, in token order) and dpos
// (may be null).
template <typename Real>
void EmbedBackward(const int32_t* tokens, int len, int d, const Real* dy,
                   Real* dtok, Real* dpos);

// Feed-forward block y = act(x W1 + b1) W2 + b2 (b1, b2 may be null), the
// same function as an expert (expert_worker/expert_ffn.h): activation 0 GELU
// (tanh form), 1 ReLU, 2 SwiGLU with W1 = [gate | up] (d, 2f).
// x, y: (N, d); W1: (d, g*f); W2: (f, d).
template <typename Real>
struct FfnCache {
  std::vector<Real> h;  // (N, g*f) pre-activation
  std::vector<Real> a;  // (N, f) activation
  // The backward's workspace, kept so that a step allocates nothing.
  std::vector<Real> da, dh, a_again;
};
template <typename Real>
void FfnForward(const Real* x, const Real* w1, const Real* b1, const Real* w2,
                const Real* b2, int n, int d, int f, int activation, Real* y,
                FfnCache<Real>* cache);
// Accumulates dW1, dW2 (and db1, db2 when not null); overwrites dx.
template <typename Real>
void FfnBackward(const Real* x, const Real* w1, const Real* w2, int n, int d,
                 int f, int activation, FfnCache<Real>* cache, const Real* dy,
                 Real* dx, Real* dw1, Real* db1, Real* dw2, Real* db2);

// Mean softmax cross-entropy of logits (N, V) against targets (N); writes
// dlogits (N, V) = d(mean loss)/dlogits. Returns the mean loss.
template <typename Real>
Real CrossEntropy(const Real* logits, const int32_t* targets, int n, int vocab,
                  Real* dlogits);

// C (m, n) = A (m, k) B (k, n) [+ C when accumulate], with A or B
// transposed in storage when asked. fp32 runs on BLAS (sgemm); fp64 (the
// gradient checks) is a plain triple loop.
// Threads of the fp32 MatMul (process-wide) and of the activation kernels
// (the calling thread's: call it on the thread that computes); 0 keeps the
// libraries' defaults. A fixed count keeps results reproducible.
void SetMatMulThreads(int threads);

template <typename Real>
void MatMul(const Real* a, const Real* b, int m, int n, int k, bool trans_a,
            bool trans_b, bool accumulate, Real* c);

// The fp32 versions that run the vectorised kernels (layers.cc).
template <>
void RmsNormForward<float>(const float* x, const float* g, int n, int d,
                           float* y);
template <>
void RmsNormBackward<float>(const float* x, const float* g, const float* dy,
                            int n, int d, float* dx, float* dg);
template <>
void FfnForward<float>(const float* x, const float* w1, const float* b1,
                       const float* w2, const float* b2, int n, int d, int f,
                       int activation, float* y, FfnCache<float>* cache);
template <>
void FfnBackward<float>(const float* x, const float* w1, const float* w2, int n,
                        int d, int f, int activation, FfnCache<float>* cache,
                        const float* dy, float* dx, float* dw1, float* db1,
                        float* dw2, float* db2);
template <>
float CrossEntropy<float>(const float* logits, const int32_t* targets, int n,
                          int vocab, float* dlogits);

}  // namespace switchyard::trainer

#endif  // SWITCHYARD_TRAINER_LAYERS_H_
