#include "trainer/model.h"

#include <algorithm>
#include <cmath>
#include <sstream>

namespace switchyard::trainer {

namespace {

// dst[i] += src[i].
template <typename Real>
void AddInto(const std::vector<Real>& src, std::vector<Real>* dst) {
  for (size_t i = 0; i < src.size(); ++i) (*dst)[i] += src[i];
}

}  // namespace

int ActivationCode(const std::string& activation) {
  if (activation == "relu") return 1;
  if (activation == "swiglu") return 2;
  return 0;
}

template <typename Real>
Transformer<Real>::Transformer(const config::SwitchyardConfig& config)
    : model_(config.model()),
      seed_(config.training().seed()),
      router_(RouterOptions::FromModel(config.model())),
      eval_router_(RouterOptions::ForEvaluation(config)),
      activation_(ActivationCode(config.model().activation())),
      rotary_(config.model().positions() == "rotary"),
      layernorm_(config.model().norm() == "layernorm"),
      layout_(DenseLayout(config.model())) {
  for (const DenseTensor& t : layout_) offset_[t.name] = t.offset;
  num_params_ = layout_.back().offset + layout_.back().numel();
}

template <typename Real>
const Real* Transformer<Real>::Param(const Real* params,
                                     const std::string& name) const {
  auto it = offset_.find(name);
  return it == offset_.end() ? nullptr : params + it->second;
}

template <typename Real>
Real* Transformer<Real>::Grad(Real* grads, const std::string& name) const {
  auto it = offset_.find(name);
  return it == offset_.end() ? nullptr : grads + it->second;
}

template <typename Real>
void Transformer<Real>::NormForward(const Real* params,
                                    const std::string& prefix, const Real* x,
                                    int n, Real* y) const {
  const int d = model_.d_model();
  const Real* g = Param(params, prefix + ".scale");
  if (layernorm_) {
    LayerNormForward(x, g, Param(params, prefix + ".bias"), n, d, y);
  } else {
    RmsNormForward(x, g, n, d, y);
  }
}

template <typename Real>
void Transformer<Real>::NormBackward(const Real* params,
                                     const std::string& prefix, const Real* x,
                                     const Real* dy, int n, Real* dx,
                                     Real* grads) const {
  const int d = model_.d_model();
  const Real* g = Param(params, prefix + ".scale");
  Real* dg = Grad(grads, prefix + ".scale");
  if (layernorm_) {
    LayerNormBackward(x, g, dy, n, d, dx, dg, Grad(grads, prefix + ".bias"));
  } else {
    RmsNormBackward(x, g, dy, n, d, dx, dg);
  }
}

template <typename Real>
Status Transformer<Real>::Forward(const Real* params, const Batch& batch,
                                  bool train, const PassId& pass,
                                  MoeExperts<Real>* experts, Cache* cache,
                                  LossReport* report) {
  const int B = batch.batch_size, L = batch.seq_len;
  const int d = model_.d_model(), V = model_.vocab_size();
  const int heads = model_.num_heads();
  if (B < 1 || L < 1 || L > model_.seq_len() ||
      batch.inputs.size() != static_cast<size_t>(B) * L ||
      batch.targets.size() != batch.inputs.size()) {
    return InvalidArgumentError("batch of " + std::to_string(B) + " x " +
                                std::to_string(L) +
                                " tokens does not fit the model (seq_len " +
                                std::to_string(model_.seq_len()) + ")");
  }
  for (size_t i = 0; i < batch.inputs.size(); ++i) {
    if (batch.inputs[i] < 0 || batch.inputs[i] >= V || batch.targets[i] < 0 ||
        batch.targets[i] >= V) {
      return InvalidArgumentError("token at " + std::to_string(i) +
                                  " is outside the vocabulary of " +
                                  std::to_string(V));
    }
  }
  const int N = B * L;
  const size_t nd = static_cast<size_t>(N) * d;
  cache->batch = B;
  cache->len = L;
  cache->layers.resize(model_.num_layers());
  report->tokens = N;
  report->moe.clear();

  // x (N, d) = tok_embed[tokens] (+ pos_embed[0 .. L)).
  std::vector<Real> x(nd);
  const Real* tok = Param(params, "tok_embed");
  const Real* pos = rotary_ ? nullptr : Param(params, "pos_embed");
  for (int b = 0; b < B; ++b) {
    EmbedForward(batch.inputs.data() + static_cast<size_t>(b) * L, L, d, tok,
                 pos, x.data() + static_cast<size_t>(b) * L * d);
  }
  int moe = 0;
  for (int l = 0; l < model_.num_layers(); ++l) {
    LayerCache& c = cache->layers[l];
    const std::string p = "layers." + std::to_string(l);
    c.x = std::move(x);
    // h (N, d) = x + Attention(Norm1(x)), one causal sequence at a time.
    c.n1.resize(nd);
    NormForward(params, p + ".norm1", c.x.data(), N, c.n1.data());
    c.attn.resize(B);
    c.h = c.x;
    std::vector<Real> attn_out(static_cast<size_t>(L) * d);
    const Real* wq = Param(params, p + ".attn.wq");
    const Real* wk = Param(params, p + ".attn.wk");
    const Real* wv = Param(params, p + ".attn.wv");
    const Real* wo = Param(params, p + ".attn.wo");
    for (int b = 0; b < B; ++b) {
      const size_t at = static_cast<size_t>(b) * L * d;
      AttentionForward(c.n1.data() + at, wq, wk, wv, wo, L, d, heads, rotary_,
                       attn_out.data(), &c.attn[b]);
      for (size_t i = 0; i < attn_out.size(); ++i) c.h[at + i] += attn_out[i];
    }
    // x' (N, d) = h + Ffn(Norm2(h)), the FFN dense or mixture-of-experts.
    c.n2.resize(nd);
    NormForward(params, p + ".norm2", c.h.data(), N, c.n2.data());
    std::vector<Real> y(nd);
    if (IsMoeLayer(model_, l)) {
      c.jitter.clear();
      if (train && router_.jitter > 0) {
        c.jitter =
            JitterMultipliers(seed_, pass.step, pass.rank, pass.micro_batch,
                              moe, N, d, router_.jitter);
      }
      c.route = RouteForward(train ? router_ : eval_router_, c.n2.data(), N, d,
                             Param(params, p + ".router"),
                             c.jitter.empty() ? nullptr : c.jitter.data());
      RETURN_IF_ERROR(experts->Forward(moe, pass.micro_batch, train,
                                       c.n2.data(), c.route, y.data()));
      MoeLayerStats stats;
      stats.load = c.route.load;
      stats.assignments = N * c.route.k;
      stats.dropped = c.route.dropped;
      stats.aux_loss = static_cast<double>(c.route.aux_loss);
      stats.z_loss = static_cast<double>(c.route.z_loss);
      report->aux_loss += stats.aux_loss;
      report->z_loss += stats.z_loss;
      report->moe.push_back(std::move(stats));
      ++moe;
    } else {
      FfnForward(c.n2.data(), Param(params, p + ".ffn.w1"),
                 Param(params, p + ".ffn.b1"), Param(params, p + ".ffn.w2"),
                 Param(params, p + ".ffn.b2"), N, d, model_.d_ff(), activation_,
                 y.data(), &c.ffn);
    }
    x = c.h;
    AddInto(y, &x);
  }
  // logits (N, V) = FinalNorm(x) @ lm_head.
  cache->x_final = std::move(x);
  cache->n_final.resize(nd);
  NormForward(params, "final_norm", cache->x_final.data(), N,
              cache->n_final.data());
  cache->logits.resize(static_cast<size_t>(N) * V);
  MatMul(cache->n_final.data(), Param(params, "lm_head"), N, V, d, false, false,
         false, cache->logits.data());
  return OkStatus();
}

template <typename Real>
StatusOr<LossReport> Transformer<Real>::Evaluate(const Real* params,
                                                 const Batch& batch,
                                                 MoeExperts<Real>* experts,
                                                 std::vector<Real>* logits) {
  Cache cache;
  LossReport report;
  RETURN_IF_ERROR(Forward(params, batch, /*train=*/false, PassId(), experts,
                          &cache, &report));
  std::vector<Real> unused(cache.logits.size());
  report.loss = static_cast<double>(CrossEntropy(
      cache.logits.data(), batch.targets.data(),
      static_cast<int>(report.tokens), model_.vocab_size(), unused.data()));
  if (logits != nullptr) *logits = std::move(cache.logits);
  return report;
}

template <typename Real>
StatusOr<LossReport> Transformer<Real>::TrainStep(
    const Real* params, const Batch& batch, const PassId& pass, Real loss_scale,
    MoeExperts<Real>* experts, Real* grads) {
  Cache cache;
  LossReport report;
  RETURN_IF_ERROR(
      Forward(params, batch, /*train=*/true, pass, experts, &cache, &report));
  const int B = cache.batch, L = cache.len, N = B * L;
  const int d = model_.d_model(), V = model_.vocab_size();
  const int heads = model_.num_heads();
  const size_t nd = static_cast<size_t>(N) * d;

  // dlogits (N, V) = loss_scale * d(mean cross-entropy)/dlogits.
  std::vector<Real> dlogits(static_cast<size_t>(N) * V);
  report.loss = static_cast<double>(CrossEntropy(
      cache.logits.data(), batch.targets.data(), N, V, dlogits.data()));
  if (!std::isfinite(report.loss) || !std::isfinite(report.aux_loss) ||
      !std::isfinite(report.z_loss)) {
    // Before any gradient leaves this pass: nothing of the step is applied.
    std::ostringstream what;
    what << "non-finite loss at step " << pass.step << ", rank " << pass.rank
         << ", micro-batch " << pass.micro_batch << " (cross-entropy "
         << report.loss << ", aux " << report.aux_loss << ", z "
         << report.z_loss
         << "): the run has diverged and stops before this step is applied; "
            "resume from the last checkpoint with a lower "
            "training.learning_rate, or check the data";
    return InvalidArgumentError(what.str());
  }
  for (Real& g : dlogits) g *= loss_scale;
  // lm_head (d, V) += n_final^T dlogits; dn (N, d) = dlogits lm_head^T.
  MatMul(cache.n_final.data(), dlogits.data(), d, V, N, true, false, true,
         Grad(grads, "lm_head"));
  std::vector<Real> dn(nd), dx(nd);
  MatMul(dlogits.data(), Param(params, "lm_head"), N, d, V, false, true, false,
         dn.data());
  NormBackward(params, "final_norm", cache.x_final.data(), dn.data(), N,
               dx.data(), grads);

  int moe = static_cast<int>(report.moe.size());
  std::vector<Real> dn2(nd), dh(nd);
  for (int l = model_.num_layers() - 1; l >= 0; --l) {
    const LayerCache& c = cache.layers[l];
    const std::string p = "layers." + std::to_string(l);
    // dx holds dLoss/dx'; x' = h + Ffn(Norm2(h)).
    if (IsMoeLayer(model_, l)) {
      --moe;
      const int k = c.route.k, E = c.route.experts;
      std::vector<Real> d_gate(static_cast<size_t>(N) * k);
      RETURN_IF_ERROR(experts->Backward(moe, pass.micro_batch, N, dx.data(),
                                        dn2.data(), d_gate.data()));
      std::vector<Real> dx_router(nd), dw_router(static_cast<size_t>(d) * E);
      RouteBackward(router_, c.route, d_gate.data(), loss_scale, d,
                    Param(params, p + ".router"),
                    c.jitter.empty() ? nullptr : c.jitter.data(),
                    dx_router.data(), dw_router.data());
      AddInto(dx_router, &dn2);
      Real* g = Grad(grads, p + ".router");
      for (size_t i = 0; i < dw_router.size(); ++i) g[i] += dw_router[i];
    } else {
      FfnBackward(c.n2.data(), Param(params, p + ".ffn.w1"),
                  Param(params, p + ".ffn.w2"), N, d, model_.d_ff(),
                  activation_, c.ffn, dx.data(), dn2.data(),
                  Grad(grads, p + ".ffn.w1"), Grad(grads, p + ".ffn.b1"),
                  Grad(grads, p + ".ffn.w2"), Grad(grads, p + ".ffn.b2"));
    }
    NormBackward(params, p + ".norm2", c.h.data(), dn2.data(), N, dh.data(),
                 grads);
    AddInto(dx, &dh);  // The residual path.
    // h = x + Attention(Norm1(x)).
    std::vector<Real>& dn1 = dn;
    const Real* wq = Param(params, p + ".attn.wq");
    const Real* wk = Param(params, p + ".attn.wk");
    const Real* wv = Param(params, p + ".attn.wv");
    const Real* wo = Param(params, p + ".attn.wo");
    Real* dwq = Grad(grads, p + ".attn.wq");
    Real* dwk = Grad(grads, p + ".attn.wk");
    Real* dwv = Grad(grads, p + ".attn.wv");
    Real* dwo = Grad(grads, p + ".attn.wo");
    for (int b = 0; b < B; ++b) {
      const size_t at = static_cast<size_t>(b) * L * d;
      AttentionBackward(c.n1.data() + at, wq, wk, wv, wo, L, d, heads, rotary_,
                        c.attn[b], dh.data() + at, dn1.data() + at, dwq, dwk,
                        dwv, dwo);
    }
    NormBackward(params, p + ".norm1", c.x.data(), dn1.data(), N, dx.data(),
                 grads);
    AddInto(dh, &dx);
  }
  Real* dpos = rotary_ ? nullptr : Grad(grads, "pos_embed");
  for (int b = 0; b < B; ++b) {
    EmbedBackward(batch.inputs.data() + static_cast<size_t>(b) * L, L, d,
                  dx.data() + static_cast<size_t>(b) * L * d,
                  Grad(grads, "tok_embed"), dpos);
  }
  return report;
}

template class Transformer<float>;
template class Transformer<double>;

}  // namespace switchyard::trainer
