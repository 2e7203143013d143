#include "trainer/layers.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

namespace switchyard::trainer {

template <typename Real>
void MatMul(const Real* a, const Real* b, int m, int n, int k, bool trans_a,
            bool trans_b, bool accumulate, Real* c) {
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      Real acc = accumulate ? c[static_cast<int64_t>(i) * n + j] : Real(0);
      for (int p = 0; p < k; ++p) {
        const Real av = trans_a ? a[static_cast<int64_t>(p) * m + i]
                                : a[static_cast<int64_t>(i) * k + p];
        const Real bv = trans_b ? b[static_cast<int64_t>(j) * k + p]
                                : b[static_cast<int64_t>(p) * n + j];
        acc += av * bv;
      }
      c[static_cast<int64_t>(i) * n + j] = acc;
    }
  }
}

void SetMatMulThreads(int threads) {
  if (threads > 0) openblas_set_num_threads(threads);
}

// fp32 products go to BLAS (sgemm): deterministic for a fixed thread
// count, like every GEMM in Switchyard.
template <>
void MatMul<float>(const float* a, const float* b, int m, int n, int k,
                   bool trans_a, bool trans_b, bool accumulate, float* c) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) std::fill(c, c + static_cast<int64_t>(m) * n, 0.0f);
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, m, n, k, 1.0f, a,
              trans_a ? m : k, b, trans_b ? k : n, accumulate ? 1.0f : 0.0f, c,
              n);
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

template <typename Real>
void ApplyRotary(Real* rows, int len, int d, int heads, bool inverse) {
  const int hd = d / heads;
  for (int p = 0; p < len; ++p) {
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i + 1 < hd; i += 2) {
        const double theta =
            p / std::pow(kRopeTheta, static_cast<double>(i) / hd);
        const Real cs = static_cast<Real>(std::cos(theta));
        const Real sn =
            static_cast<Real>(inverse ? -std::sin(theta) : std::sin(theta));
        Real* pair = rows + static_cast<int64_t>(p) * d + h * hd + i;
        const Real a = pair[0], b = pair[1];
        pair[0] = a * cs - b * sn;
        pair[1] = a * sn + b * cs;
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

template <typename Real>
void AttentionForward(const Real* x, const Real* wq, const Real* wk,
                      const Real* wv, const Real* wo, int len, int d, int heads,
                      bool rotary, Real* y, AttentionCache<Real>* c) {
  const int hd = d / heads;
  const Real scale = Real(1) / std::sqrt(Real(hd));
  c->q.assign(static_cast<size_t>(len) * d, Real(0));
  c->k.assign(c->q.size(), Real(0));
  c->v.assign(c->q.size(), Real(0));
  c->context.assign(c->q.size(), Real(0));
  c->probs.assign(static_cast<size_t>(heads) * len * len, Real(0));
  MatMul(x, wq, len, d, d, false, false, false, c->q.data());
  MatMul(x, wk, len, d, d, false, false, false, c->k.data());
  MatMul(x, wv, len, d, d, false, false, false, c->v.data());
  if (rotary) {
    ApplyRotary(c->q.data(), len, d, heads, false);
    ApplyRotary(c->k.data(), len, d, heads, false);
  }
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < len; ++i) {
      Real* p = &c->probs[(static_cast<size_t>(h) * len + i) * len];
      Real m = -1e300;
      for (int j = 0; j <= i; ++j) {
        Real s = 0;
        for (int e = 0; e < hd; ++e) {
          s += c->q[static_cast<size_t>(i) * d + h * hd + e] *
               c->k[static_cast<size_t>(j) * d + h * hd + e];
        }
        p[j] = s * scale;
        m = std::max(m, p[j]);
      }
      Real sum = 0;
      for (int j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - m));
      for (int j = 0; j <= i; ++j) p[j] /= sum;
      for (int e = 0; e < hd; ++e) {
        Real acc = 0;
        for (int j = 0; j <= i; ++j) {
          acc += p[j] * c->v[static_cast<size_t>(j) * d + h * hd + e];
        }
        c->context[static_cast<size_t>(i) * d + h * hd + e] = acc;
      }
    }
  }
  MatMul(c->context.data(), wo, len, d, d, false, false, false, y);
}

template <typename Real>
void AttentionBackward(const Real* x, const Real* wq, const Real* wk,
                       const Real* wv, const Real* wo, int len, int d,
                       int heads, bool rotary, const AttentionCache<Real>& c,
                       const Real* dy, Real* dx, Real* dwq, Real* dwk,
                       Real* dwv, Real* dwo) {
  const int hd = d / heads;
  const Real scale = Real(1) / std::sqrt(Real(hd));
  const size_t nd = static_cast<size_t>(len) * d;
  std::vector<Real> dctx(nd), dq(nd, Real(0)), dk(nd, Real(0)), dv(nd, Real(0));
  MatMul(c.context.data(), dy, d, d, len, true, false, true, dwo);  // ctx^T dy
  MatMul(dy, wo, len, d, d, false, true, false, dctx.data());       // dy Wo^T
  std::vector<Real> dp(len);
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < len; ++i) {
      const Real* p = &c.probs[(static_cast<size_t>(h) * len + i) * len];
      // dP_ij = dctx_i . v_j; dv_j += P_ij dctx_i.
      Real dot = 0;
      for (int j = 0; j <= i; ++j) {
        Real s = 0;
        for (int e = 0; e < hd; ++e) {
          const Real g = dctx[static_cast<size_t>(i) * d + h * hd + e];
          s += g * c.v[static_cast<size_t>(j) * d + h * hd + e];
          dv[static_cast<size_t>(j) * d + h * hd + e] += p[j] * g;
        }
        dp[j] = s;
        dot += p[j] * s;
      }
      // Softmax backward, then through the scaled dot products.
      for (int j = 0; j <= i; ++j) {
        const Real ds = p[j] * (dp[j] - dot) * scale;
        for (int e = 0; e < hd; ++e) {
          dq[static_cast<size_t>(i) * d + h * hd + e] +=
              ds * c.k[static_cast<size_t>(j) * d + h * hd + e];
          dk[static_cast<size_t>(j) * d + h * hd + e] +=
              ds * c.q[static_cast<size_t>(i) * d + h * hd + e];
        }
      }
    }
  }
  if (rotary) {  // Back through the rotation: its transpose.
    ApplyRotary(dq.data(), len, d, heads, true);
    ApplyRotary(dk.data(), len, d, heads, true);
  }
  MatMul(x, dq.data(), d, d, len, true, false, true, dwq);
  MatMul(x, dk.data(), d, d, len, true, false, true, dwk);
  MatMul(x, dv.data(), d, d, len, true, false, true, dwv);
  MatMul(dq.data(), wq, len, d, d, false, true, false, dx);
  MatMul(dk.data(), wk, len, d, d, false, true, true, dx);
  MatMul(dv.data(), wv, len, d, d, false, true, true, dx);
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
  c->h.assign(static_cast<size_t>(n) * g * f, Real(0));
  c->a.assign(static_cast<size_t>(n) * f, Real(0));
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
                 int f, int activation, const FfnCache<Real>& c, const Real* dy,
                 Real* dx, Real* dw1, Real* db1, Real* dw2, Real* db2) {
  const int g = activation == 2 ? 2 : 1;
  std::vector<Real> da(static_cast<size_t>(n) * f),
      dh(static_cast<size_t>(n) * g * f);
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

// MatMul<float> is a specialisation (BLAS); only the double one is
// instantiated from the template.
template void MatMul<double>(const double*, const double*, int, int, int, bool,
                             bool, bool, double*);

#define SWITCHYARD_INSTANTIATE_LAYERS(Real)                                    \
  template void RmsNormForward<Real>(const Real*, const Real*, int, int,       \
                                     Real*);                                   \
  template void RmsNormBackward<Real>(const Real*, const Real*, const Real*,   \
                                      int, int, Real*, Real*);                 \
  template void LayerNormForward<Real>(const Real*, const Real*, const Real*,  \
                                       int, int, Real*);                       \
  template void LayerNormBackward<Real>(const Real*, const Real*, const Real*, \
                                        int, int, Real*, Real*, Real*);        \
  template void ApplyRotary<Real>(Real*, int, int, int, bool);                 \
  template void EmbedForward<Real>(const int32_t*, int, int, const Real*,      \
                                   const Real*, Real*);                        \
  template void EmbedBackward<Real>(const int32_t*, int, int, const Real*,     \
                                    Real*, Real*);                             \
  template void AttentionForward<Real>(                                        \
      const Real*, const Real*, const Real*, const Real*, const Real*, int,    \
      int, int, bool, Real*, AttentionCache<Real>*);                           \
  template void AttentionBackward<Real>(                                       \
      const Real*, const Real*, const Real*, const Real*, const Real*, int,    \
      int, int, bool, const AttentionCache<Real>&, const Real*, Real*, Real*,  \
      Real*, Real*, Real*);                                                    \
  template void FfnForward<Real>(const Real*, const Real*, const Real*,        \
                                 const Real*, const Real*, int, int, int, int, \
                                 Real*, FfnCache<Real>*);                      \
  template void FfnBackward<Real>(                                             \
      const Real*, const Real*, const Real*, int, int, int, int,               \
      const FfnCache<Real>&, const Real*, Real*, Real*, Real*, Real*, Real*);  \
  template Real CrossEntropy<Real>(const Real*, const int32_t*, int, int,      \
                                   Real*);

SWITCHYARD_INSTANTIATE_LAYERS(float)
SWITCHYARD_INSTANTIATE_LAYERS(double)
#undef SWITCHYARD_INSTANTIATE_LAYERS

}  // namespace switchyard::trainer
