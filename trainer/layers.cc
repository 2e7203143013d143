#include "trainer/layers.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "expert_worker/cpu/activation_kernels.h"
#include "trainer/row_kernels.h"

namespace switchyard::trainer {

namespace {

// C (m, n) = alpha * op(A) op(B) + beta * C (C not read when beta is 0),
// op(A) (m, k), op(B) (k, n); lda/ldb/ldc are row strides in elements, so
// that a head's columns of q, k and v are operands in place. fp64: a plain
// triple loop (the gradient checks); fp32: BLAS.
template <typename Real>
void Gemm(bool trans_a, bool trans_b, int m, int n, int k, Real alpha,
          const Real* a, int lda, const Real* b, int ldb, Real beta, Real* c,
          int ldc) {
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      Real acc = 0;
      for (int p = 0; p < k; ++p) {
        const Real av = trans_a ? a[static_cast<int64_t>(p) * lda + i]
                                : a[static_cast<int64_t>(i) * lda + p];
        const Real bv = trans_b ? b[static_cast<int64_t>(j) * ldb + p]
                                : b[static_cast<int64_t>(p) * ldb + j];
        acc += av * bv;
      }
      Real& out = c[static_cast<int64_t>(i) * ldc + j];
      out = alpha * acc + (beta == Real(0) ? Real(0) : beta * out);
    }
  }
}

// fp32 products go to BLAS (sgemm): deterministic for a fixed thread
// count, like every GEMM in Switchyard.
template <>
void Gemm<float>(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta,
                 float* c, int ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int i = 0; i < m; ++i) {
      float* row = c + static_cast<int64_t>(i) * ldc;
      for (int j = 0; j < n; ++j) row[j] = beta == 0.0f ? 0.0f : beta * row[j];
    }
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b,
              ldb, beta, c, ldc);
}

}  // namespace

template <typename Real>
void MatMul(const Real* a, const Real* b, int m, int n, int k, bool trans_a,
            bool trans_b, bool accumulate, Real* c) {
  Gemm(trans_a, trans_b, m, n, k, Real(1), a, trans_a ? m : k, b,
       trans_b ? k : n, accumulate ? Real(1) : Real(0), c, n);
}

void SetMatMulThreads(int threads) {
  if (threads > 0) openblas_set_num_threads(threads);
  expert_worker::SetKernelThreads(threads);
}

template <typename Real>
void RmsNormForward(const Real* x, const Real* g, int n, int d, Real* y) {
  for (int r = 0; r < n; ++r) {
    const Real* xr = x + static_cast<int64_t>(r) * d;
    Real ms = 0;
    for (int i = 0; i < d; ++i) ms += xr[i] * xr[i];
    const Real inv = Real(1) / std::sqrt(ms / d + Real(kNormEps));
    for (int i = 0; i < d; ++i)
      y[static_cast<int64_t>(r) * d + i] = xr[i] * inv * g[i];
  }
}

template <typename Real>
void RmsNormBackward(const Real* x, const Real* g, const Real* dy, int n, int d,
                     Real* dx, Real* dg) {
  for (int r = 0; r < n; ++r) {
    const Real* xr = x + static_cast<int64_t>(r) * d;
    const Real* dyr = dy + static_cast<int64_t>(r) * d;
    Real ms = 0;
    for (int i = 0; i < d; ++i) ms += xr[i] * xr[i];
    const Real inv = Real(1) / std::sqrt(ms / d + Real(kNormEps));
    // y_i = x_i * inv * g_i; dinv/dx_j = -inv^3 x_j / d.
    Real dot = 0;  // sum_i dy_i g_i x_i
    for (int i = 0; i < d; ++i) {
      dot += dyr[i] * g[i] * xr[i];
      dg[i] += dyr[i] * xr[i] * inv;
    }
    for (int j = 0; j < d; ++j) {
      dx[static_cast<int64_t>(r) * d + j] =
          dyr[j] * g[j] * inv - dot * inv * inv * inv * xr[j] / d;
    }
  }
}

// fp32: the vectorised row kernels (row_kernels.h).
template <>
void RmsNormForward<float>(const float* x, const float* g, int n, int d,
                           float* y) {
  kernels::RmsNormForward(x, g, n, d, static_cast<float>(kNormEps), y);
}

template <>
void RmsNormBackward<float>(const float* x, const float* g, const float* dy,
                            int n, int d, float* dx, float* dg) {
  kernels::RmsNormBackward(x, g, dy, n, d, static_cast<float>(kNormEps), dx,
                           dg);
}

template <typename Real>
void LayerNormForward(const Real* x, const Real* g, const Real* b, int n, int d,
                      Real* y) {
  for (int r = 0; r < n; ++r) {
    const Real* xr = x + static_cast<int64_t>(r) * d;
    Real mean = 0, var = 0;
    for (int i = 0; i < d; ++i) mean += xr[i];
    mean /= d;
    for (int i = 0; i < d; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const Real inv = Real(1) / std::sqrt(var / d + Real(kNormEps));
    for (int i = 0; i < d; ++i) {
      y[static_cast<int64_t>(r) * d + i] = (xr[i] - mean) * inv * g[i] + b[i];
    }
  }
}

template <typename Real>
void LayerNormBackward(const Real* x, const Real* g, const Real* dy, int n,
                       int d, Real* dx, Real* dg, Real* db) {
  for (int r = 0; r < n; ++r) {
    const Real* xr = x + static_cast<int64_t>(r) * d;
    const Real* dyr = dy + static_cast<int64_t>(r) * d;
    Real mean = 0, var = 0;
    for (int i = 0; i < d; ++i) mean += xr[i];
    mean /= d;
    for (int i = 0; i < d; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const Real inv = Real(1) / std::sqrt(var / d + Real(kNormEps));
    Real sum_dxhat = 0, sum_dxhat_xhat = 0;
    for (int i = 0; i < d; ++i) {
      const Real xhat = (xr[i] - mean) * inv;
      const Real dxhat = dyr[i] * g[i];
      sum_dxhat += dxhat;
      sum_dxhat_xhat += dxhat * xhat;
      dg[i] += dyr[i] * xhat;
      db[i] += dyr[i];
    }
    for (int i = 0; i < d; ++i) {
      const Real xhat = (xr[i] - mean) * inv;
      const Real dxhat = dyr[i] * g[i];
      dx[static_cast<int64_t>(r) * d + i] =
          inv * (dxhat - sum_dxhat / d - xhat * sum_dxhat_xhat / d);
    }
  }
}

RotaryTable::RotaryTable(int max_len, int head_dim)
    : max_len(max_len), head_dim(head_dim) {
  const int pairs = head_dim / 2;
  cos.resize(static_cast<size_t>(max_len) * pairs);
  sin.resize(cos.size());
  for (int p = 0; p < max_len; ++p) {
    for (int i = 0; i < pairs; ++i) {
      const double theta =
          p / std::pow(kRopeTheta, static_cast<double>(2 * i) / head_dim);
      cos[static_cast<size_t>(p) * pairs + i] = std::cos(theta);
      sin[static_cast<size_t>(p) * pairs + i] = std::sin(theta);
    }
  }
}

template <typename Real>
void ApplyRotary(Real* rows, int len, int d, int heads,
                 const RotaryTable& table, bool inverse) {
  const int hd = table.head_dim, pairs = hd / 2;
  for (int p = 0; p < len; ++p) {
    const double* cos = &table.cos[static_cast<size_t>(p) * pairs];
    const double* sin = &table.sin[static_cast<size_t>(p) * pairs];
    for (int h = 0; h < heads; ++h) {
      Real* head = rows + static_cast<int64_t>(p) * d + h * hd;
      for (int i = 0; i < pairs; ++i) {
        const Real cs = static_cast<Real>(cos[i]);
        const Real sn = static_cast<Real>(inverse ? -sin[i] : sin[i]);
        const Real a = head[2 * i], b = head[2 * i + 1];
        head[2 * i] = a * cs - b * sn;
        head[2 * i + 1] = a * sn + b * cs;
      }
    }
  }
}

template <typename Real>
void EmbedForward(const int32_t* tokens, int len, int d, const Real* tok,
                  const Real* pos, Real* y) {
  for (int t = 0; t < len; ++t) {
    const Real* e = tok + static_cast<int64_t>(tokens[t]) * d;
    const Real* p = pos ? pos + static_cast<int64_t>(t) * d : nullptr;
    Real* out = y + static_cast<int64_t>(t) * d;
    for (int i = 0; i < d; ++i) out[i] = e[i] + (p ? p[i] : Real(0));
  }
}

template <typename Real>
void EmbedBackward(const int32_t* tokens, int len, int d, const Real* dy,
                   Real* dtok, Real* dpos) {
  for (int t = 0; t < len; ++t) {  // Token order: a fixed summation order.
    Real* e = dtok + static_cast<int64_t>(tokens[t]) * d;
    const Real* g = dy + static_cast<int64_t>(t) * d;
    for (int i = 0; i < d; ++i) {
      e[i] += g[i];
      if (dpos) dpos[static_cast<int64_t>(t) * d + i] += g[i];
    }
  }
}

namespace {

// Row i of probs (len, len): softmax over j <= i in place, zeros after.
template <typename Real>
void CausalSoftmax(Real* probs, int len) {
  for (int i = 0; i < len; ++i) {
    Real* p = probs + static_cast<size_t>(i) * len;
    const Real m = *std::max_element(p, p + i + 1);
    Real sum = 0;
    for (int j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - m));
    for (int j = 0; j <= i; ++j) p[j] /= sum;
    std::fill(p + i + 1, p + len, Real(0));
  }
}

template <>
void CausalSoftmax<float>(float* probs, int len) {
  kernels::CausalSoftmax(probs, len);
}

// g = dLoss/dP in, dLoss/dS * scale out:
// P_ij (g_ij - sum_j' P_ij' g_ij') * scale for j <= i, 0 after.
template <typename Real>
void CausalSoftmaxBackward(const Real* probs, Real* g, int len, Real scale) {
  for (int i = 0; i < len; ++i) {
    const Real* p = probs + static_cast<size_t>(i) * len;
    Real* gr = g + static_cast<size_t>(i) * len;
    Real dot = 0;
    for (int j = 0; j <= i; ++j) dot += p[j] * gr[j];
    for (int j = 0; j <= i; ++j) gr[j] = p[j] * (gr[j] - dot) * scale;
    std::fill(gr + i + 1, gr + len, Real(0));
  }
}

template <>
void CausalSoftmaxBackward<float>(const float* probs, float* g, int len,
                                  float scale) {
  kernels::CausalSoftmaxBackward(probs, g, len, scale);
}

}  // namespace

template <typename Real>
void AttentionForward(const Real* x, const Real* wq, const Real* wk,
                      const Real* wv, const Real* wo, int batch, int len, int d,
                      int heads, const RotaryTable* rotary, Real* y,
                      AttentionCache<Real>* c) {
  const int hd = d / heads, n = batch * len;
  const Real scale = Real(1) / std::sqrt(Real(hd));
  const size_t nd = static_cast<size_t>(n) * d;
  const size_t ll = static_cast<size_t>(len) * len;
  c->q.resize(nd);
  c->k.resize(nd);
  c->v.resize(nd);
  c->context.resize(nd);
  c->probs.resize(static_cast<size_t>(batch) * heads * ll);
  MatMul(x, wq, n, d, d, false, false, false, c->q.data());
  MatMul(x, wk, n, d, d, false, false, false, c->k.data());
  MatMul(x, wv, n, d, d, false, false, false, c->v.data());
  for (int b = 0; b < batch; ++b) {
    const size_t at = static_cast<size_t>(b) * len * d;
    if (rotary != nullptr) {
      ApplyRotary(c->q.data() + at, len, d, heads, *rotary, false);
      ApplyRotary(c->k.data() + at, len, d, heads, *rotary, false);
    }
    for (int h = 0; h < heads; ++h) {
      // S = q_h k_h^T / sqrt(hd), all of it (the masked half costs less in
      // one GEMM than skipping it does); P = its causal row softmax.
      Real* probs = &c->probs[(static_cast<size_t>(b) * heads + h) * ll];
      const size_t col = at + static_cast<size_t>(h) * hd;
      Gemm(false, true, len, len, hd, scale, c->q.data() + col, d,
           c->k.data() + col, d, Real(0), probs, len);
      CausalSoftmax(probs, len);
      // context_h = P v_h.
      Gemm(false, false, len, hd, len, Real(1), probs, len, c->v.data() + col,
           d, Real(0), c->context.data() + col, d);
    }
  }
  MatMul(c->context.data(), wo, n, d, d, false, false, false, y);
}

template <typename Real>
void AttentionBackward(const Real* x, const Real* wq, const Real* wk,
                       const Real* wv, const Real* wo, int batch, int len,
                       int d, int heads, const RotaryTable* rotary,
                       AttentionCache<Real>* c, const Real* dy, Real* dx,
                       Real* dwq, Real* dwk, Real* dwv, Real* dwo) {
  const int hd = d / heads, n = batch * len;
  const Real scale = Real(1) / std::sqrt(Real(hd));
  const size_t nd = static_cast<size_t>(n) * d;
  const size_t ll = static_cast<size_t>(len) * len;
  c->dctx.resize(nd);
  c->dq.resize(nd);
  c->dk.resize(nd);
  c->dv.resize(nd);
  c->ds.resize(ll);
  Real* ds = c->ds.data();
  MatMul(c->context.data(), dy, d, d, n, true, false, true, dwo);  // ctx^T dy
  MatMul(dy, wo, n, d, d, false, true, false, c->dctx.data());     // dy Wo^T
  for (int b = 0; b < batch; ++b) {
    const size_t at = static_cast<size_t>(b) * len * d;
    for (int h = 0; h < heads; ++h) {
      const Real* probs = &c->probs[(static_cast<size_t>(b) * heads + h) * ll];
      const size_t col = at + static_cast<size_t>(h) * hd;
      const Real* dctx_h = c->dctx.data() + col;
      // dP = dctx_h v_h^T; dv_h = P^T dctx_h.
      Gemm(false, true, len, len, hd, Real(1), dctx_h, d, c->v.data() + col, d,
           Real(0), ds, len);
      Gemm(true, false, len, hd, len, Real(1), probs, len, dctx_h, d, Real(0),
           c->dv.data() + col, d);
      // Softmax backward, with the scale of the dot products.
      CausalSoftmaxBackward(probs, ds, len, scale);
      // dq_h = dS k_h; dk_h = dS^T q_h.
      Gemm(false, false, len, hd, len, Real(1), ds, len, c->k.data() + col, d,
           Real(0), c->dq.data() + col, d);
      Gemm(true, false, len, hd, len, Real(1), ds, len, c->q.data() + col, d,
           Real(0), c->dk.data() + col, d);
    }
    if (rotary != nullptr) {  // Back through the rotation: its transpose.
      ApplyRotary(c->dq.data() + at, len, d, heads, *rotary, true);
      ApplyRotary(c->dk.data() + at, len, d, heads, *rotary, true);
    }
  }
  MatMul(x, c->dq.data(), d, d, n, true, false, true, dwq);
  MatMul(x, c->dk.data(), d, d, n, true, false, true, dwk);
  MatMul(x, c->dv.data(), d, d, n, true, false, true, dwv);
  MatMul(c->dq.data(), wq, n, d, d, false, true, false, dx);
  MatMul(c->dk.data(), wk, n, d, d, false, true, true, dx);
  MatMul(c->dv.data(), wv, n, d, d, false, true, true, dx);
}

namespace {

constexpr double kGeluC = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluA = 0.044715;

template <typename Real>
Real Sigmoid(Real z) {
  return Real(1) / (Real(1) + std::exp(-z));
}

}  // namespace

template <typename Real>
void FfnForward(const Real* x, const Real* w1, const Real* b1, const Real* w2,
                const Real* b2, int n, int d, int f, int activation, Real* y,
                FfnCache<Real>* c) {
  const int g = activation == 2 ? 2 : 1;
  c->h.resize(static_cast<size_t>(n) * g * f);
  c->a.resize(static_cast<size_t>(n) * f);
  MatMul(x, w1, n, g * f, d, false, false, false, c->h.data());
  for (int r = 0; r < n; ++r) {
    Real* h = &c->h[static_cast<size_t>(r) * g * f];
    if (b1 != nullptr) {
      for (int j = 0; j < g * f; ++j) h[j] += b1[j];
    }
    Real* a = &c->a[static_cast<size_t>(r) * f];
    for (int j = 0; j < f; ++j) {
      const Real v = h[j];
      if (activation == 0) {
        a[j] = Real(0.5) * v *
               (Real(1) +
                std::tanh(Real(kGeluC) * (v + Real(kGeluA) * v * v * v)));
      } else if (activation == 1) {
        a[j] = v > 0 ? v : Real(0);
      } else {
        a[j] = v * Sigmoid(v) * h[f + j];
      }
    }
  }
  MatMul(c->a.data(), w2, n, d, f, false, false, false, y);
  if (b2 != nullptr) {
    for (int r = 0; r < n; ++r) {
      for (int i = 0; i < d; ++i) y[static_cast<int64_t>(r) * d + i] += b2[i];
    }
  }
}

template <typename Real>
void FfnBackward(const Real* x, const Real* w1, const Real* w2, int n, int d,
                 int f, int activation, FfnCache<Real>* cache, const Real* dy,
                 Real* dx, Real* dw1, Real* db1, Real* dw2, Real* db2) {
  const int g = activation == 2 ? 2 : 1;
  const FfnCache<Real>& c = *cache;
  std::vector<Real>& da = cache->da;
  std::vector<Real>& dh = cache->dh;
  da.resize(static_cast<size_t>(n) * f);
  dh.resize(static_cast<size_t>(n) * g * f);
  MatMul(c.a.data(), dy, f, d, n, true, false, true, dw2);  // a^T dy
  MatMul(dy, w2, n, f, d, false, true, false, da.data());   // dy W2^T
  for (int r = 0; r < n; ++r) {
    const Real* h = &c.h[static_cast<size_t>(r) * g * f];
    const Real* dar = &da[static_cast<size_t>(r) * f];
    Real* dhr = &dh[static_cast<size_t>(r) * g * f];
    for (int j = 0; j < f; ++j) {
      const Real v = h[j];
      if (activation == 0) {
        const Real t = std::tanh(Real(kGeluC) * (v + Real(kGeluA) * v * v * v));
        dhr[j] = dar[j] * (Real(0.5) * (Real(1) + t) +
                           Real(0.5) * v * (Real(1) - t * t) * Real(kGeluC) *
                               (Real(1) + Real(3 * kGeluA) * v * v));
      } else if (activation == 1) {
        dhr[j] = v > 0 ? dar[j] : Real(0);
      } else {
        const Real s = Sigmoid(v);
        dhr[j] = dar[j] * h[f + j] * s * (Real(1) + v * (Real(1) - s));
        dhr[f + j] = dar[j] * v * s;
      }
    }
    if (db1 != nullptr) {
      for (int j = 0; j < g * f; ++j) db1[j] += dhr[j];
    }
    if (db2 != nullptr) {
      for (int i = 0; i < d; ++i) db2[i] += dy[static_cast<int64_t>(r) * d + i];
    }
  }
  MatMul(x, dh.data(), d, g * f, n, true, false, true, dw1);   // x^T dh
  MatMul(dh.data(), w1, n, d, g * f, false, true, false, dx);  // dh W1^T
}

// fp32: the expert's own elementwise kernels (multi-threaded, vectorised,
// the same bits on every CPU), so that this layer is the expert function.
namespace {

expert_worker::Activation KernelActivation(int activation) {
  return activation == 1   ? expert_worker::Activation::kRelu
         : activation == 2 ? expert_worker::Activation::kSwiglu
                           : expert_worker::Activation::kGelu;
}

}  // namespace

template <>
void FfnForward<float>(const float* x, const float* w1, const float* b1,
                       const float* w2, const float* b2, int n, int d, int f,
                       int activation, float* y, FfnCache<float>* c) {
  const int g = activation == 2 ? 2 : 1;
  c->h.resize(static_cast<size_t>(n) * g * f);
  c->a.resize(static_cast<size_t>(n) * f);
  MatMul(x, w1, n, g * f, d, false, false, false, c->h.data());
  expert_worker::ActivationForward(KernelActivation(activation), c->h.data(),
                                   b1, n, f, c->a.data());
  MatMul(c->a.data(), w2, n, d, f, false, false, false, y);
  if (b2 != nullptr) expert_worker::AddRowBias(y, n, d, b2);
}

template <>
void FfnBackward<float>(const float* x, const float* w1, const float* w2, int n,
                        int d, int f, int activation, FfnCache<float>* cache,
                        const float* dy, float* dx, float* dw1, float* db1,
                        float* dw2, float* db2) {
  const int g = activation == 2 ? 2 : 1;
  const FfnCache<float>& c = *cache;
  std::vector<float>& da = cache->da;
  std::vector<float>& dh = cache->dh;
  std::vector<float>& a = cache->a_again;  // The kernel writes act(h) again.
  da.resize(static_cast<size_t>(n) * f);
  dh.resize(static_cast<size_t>(n) * g * f);
  a.resize(da.size());
  MatMul(c.a.data(), dy, f, d, n, true, false, true, dw2);  // a^T dy
  MatMul(dy, w2, n, f, d, false, true, false, da.data());   // dy W2^T
  expert_worker::ActivationBackward(KernelActivation(activation), c.h.data(),
                                    da.data(), n, f, dh.data(), a.data());
  for (int r = 0; r < n; ++r) {
    if (db1 != nullptr) {
      const float* dhr = &dh[static_cast<size_t>(r) * g * f];
      for (int j = 0; j < g * f; ++j) db1[j] += dhr[j];
    }
    if (db2 != nullptr) {
      for (int i = 0; i < d; ++i) db2[i] += dy[static_cast<int64_t>(r) * d + i];
    }
  }
  MatMul(x, dh.data(), d, g * f, n, true, false, true, dw1);   // x^T dh
  MatMul(dh.data(), w1, n, d, g * f, false, true, false, dx);  // dh W1^T
}

template <typename Real>
Real CrossEntropy(const Real* logits, const int32_t* targets, int n, int vocab,
                  Real* dlogits) {
  Real total = 0;
  for (int r = 0; r < n; ++r) {
    const Real* lg = logits + static_cast<int64_t>(r) * vocab;
    Real* dl = dlogits + static_cast<int64_t>(r) * vocab;
    const Real m = *std::max_element(lg, lg + vocab);
    Real sum = 0;
    for (int v = 0; v < vocab; ++v) sum += (dl[v] = std::exp(lg[v] - m));
    total += std::log(sum) + m - lg[targets[r]];
    for (int v = 0; v < vocab; ++v) dl[v] = dl[v] / sum / n;
    dl[targets[r]] -= Real(1) / n;
  }
  return n > 0 ? total / n : Real(0);
}

template <>
float CrossEntropy<float>(const float* logits, const int32_t* targets, int n,
                          int vocab, float* dlogits) {
  return kernels::CrossEntropy(logits, targets, n, vocab, dlogits);
}

template void MatMul<float>(const float*, const float*, int, int, int, bool,
                            bool, bool, float*);
template void MatMul<double>(const double*, const double*, int, int, int, bool,
                             bool, bool, double*);

#define SWITCHYARD_INSTANTIATE_LAYERS(Real)                                    \
  template void LayerNormForward<Real>(const Real*, const Real*, const Real*,  \
                                       int, int, Real*);                       \
  template void LayerNormBackward<Real>(const Real*, const Real*, const Real*, \
                                        int, int, Real*, Real*, Real*);        \
  template void ApplyRotary<Real>(Real*, int, int, int, const RotaryTable&,    \
                                  bool);                                       \
  template void EmbedForward<Real>(const int32_t*, int, int, const Real*,      \
                                   const Real*, Real*);                        \
  template void EmbedBackward<Real>(const int32_t*, int, int, const Real*,     \
                                    Real*, Real*);                             \
  template void AttentionForward<Real>(                                        \
      const Real*, const Real*, const Real*, const Real*, const Real*, int,    \
      int, int, int, const RotaryTable*, Real*, AttentionCache<Real>*);        \
  template void AttentionBackward<Real>(                                       \
      const Real*, const Real*, const Real*, const Real*, const Real*, int,    \
      int, int, int, const RotaryTable*, AttentionCache<Real>*, const Real*,   \
      Real*, Real*, Real*, Real*, Real*);

SWITCHYARD_INSTANTIATE_LAYERS(float)
SWITCHYARD_INSTANTIATE_LAYERS(double)
#undef SWITCHYARD_INSTANTIATE_LAYERS

// The fp32 versions of these are specialisations (the kernels).
template void RmsNormForward<double>(const double*, const double*, int, int,
                                     double*);
template void RmsNormBackward<double>(const double*, const double*,
                                      const double*, int, int, double*,
                                      double*);
template double CrossEntropy<double>(const double*, const int32_t*, int, int,
                                     double*);
template void FfnForward<double>(const double*, const double*, const double*,
                                 const double*, const double*, int, int, int,
                                 int, double*, FfnCache<double>*);
template void FfnBackward<double>(const double*, const double*, const double*,
                                  int, int, int, int, FfnCache<double>*,
                                  const double*, double*, double*, double*,
                                  double*, double*);

}  // namespace switchyard::trainer
