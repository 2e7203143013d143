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
      rotary_table_(rotary_ ? RotaryTable(config.model().seq_len(),
                                          config.model().d_model() /
                                              config.model().num_heads())
                            : RotaryTable()),
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
  const int num_layers = model_.num_layers();
  cache->batch = B;
  cache->len = L;
  cache->layers.resize(num_layers);
  report->tokens = N;
  report->moe.clear();
  // Layer l's output is layer l + 1's input (the last one's: x_final).
  auto input_of = [cache, num_layers](int l) -> std::vector<Real>& {
    return l < num_layers ? cache->layers[l].x : cache->x_final;
  };

  // x (N, d) = tok_embed[tokens] (+ pos_embed[0 .. L)).
  std::vector<Real>& x0 = input_of(0);
  x0.resize(nd);
  const Real* tok = Param(params, "tok_embed");
  const Real* pos = rotary_ ? nullptr : Param(params, "pos_embed");
  for (int b = 0; b < B; ++b) {
    EmbedForward(batch.inputs.data() + static_cast<size_t>(b) * L, L, d, tok,
                 pos, x0.data() + static_cast<size_t>(b) * L * d);
  }
  std::vector<Real>& out = cache->block_out;
  out.resize(nd);
  int moe = 0;
  for (int l = 0; l < num_layers; ++l) {
    LayerCache& c = cache->layers[l];
    const std::string p = "layers." + std::to_string(l);
    // h (N, d) = x + Attention(Norm1(x)), causal within each sequence.
    c.n1.resize(nd);
    NormForward(params, p + ".norm1", c.x.data(), N, c.n1.data());
    AttentionForward(c.n1.data(), Param(params, p + ".attn.wq"),
                     Param(params, p + ".attn.wk"),
                     Param(params, p + ".attn.wv"),
                     Param(params, p + ".attn.wo"), B, L, d, heads, rotary(),
                     out.data(), &c.attn);
    c.h.resize(nd);
    for (size_t i = 0; i < nd; ++i) c.h[i] = c.x[i] + out[i];
    // x' (N, d) = h + Ffn(Norm2(h)), the FFN dense or mixture-of-experts.
    c.n2.resize(nd);
    NormForward(params, p + ".norm2", c.h.data(), N, c.n2.data());
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
      std::fill(out.begin(), out.end(), Real(0));
      RETURN_IF_ERROR(experts->Forward(moe, pass.micro_batch, train,
                                       c.n2.data(), c.route, out.data()));
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
                 out.data(), &c.ffn);
    }
    std::vector<Real>& next = input_of(l + 1);
    next.resize(nd);
    for (size_t i = 0; i < nd; ++i) next[i] = c.h[i] + out[i];
  }
  // logits (N, V) = FinalNorm(x) @ lm_head.
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
  Cache& cache = cache_;
  LossReport report;
  RETURN_IF_ERROR(Forward(params, batch, /*train=*/false, PassId(), experts,
                          &cache, &report));
  cache.dlogits.resize(cache.logits.size());  // Not used.
  report.loss = static_cast<double>(
      CrossEntropy(cache.logits.data(), batch.targets.data(),
                   static_cast<int>(report.tokens), model_.vocab_size(),
                   cache.dlogits.data()));
  if (logits != nullptr) *logits = cache.logits;
  return report;
}

template <typename Real>
StatusOr<LossReport> Transformer<Real>::TrainStep(
    const Real* params, const Batch& batch, const PassId& pass, Real loss_scale,
    MoeExperts<Real>* experts, Real* grads) {
  Cache& cache = cache_;
  LossReport report;
  RETURN_IF_ERROR(
      Forward(params, batch, /*train=*/true, pass, experts, &cache, &report));
  const int B = cache.batch, L = cache.len, N = B * L;
  const int d = model_.d_model(), V = model_.vocab_size();
  const int heads = model_.num_heads();
  const size_t nd = static_cast<size_t>(N) * d;

  // dlogits (N, V) = loss_scale * d(mean cross-entropy)/dlogits.
  std::vector<Real>& dlogits = cache.dlogits;
  dlogits.resize(static_cast<size_t>(N) * V);
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
  std::vector<Real>&dn = cache.dn, &dx = cache.dx, &dn2 = cache.dn2,
  &dh = cache.dh;
  dn.resize(nd);
  dx.resize(nd);
  dn2.resize(nd);
  dh.resize(nd);
  MatMul(dlogits.data(), Param(params, "lm_head"), N, d, V, false, true, false,
         dn.data());
  NormBackward(params, "final_norm", cache.x_final.data(), dn.data(), N,
               dx.data(), grads);

  int moe = static_cast<int>(report.moe.size());
  for (int l = model_.num_layers() - 1; l >= 0; --l) {
    LayerCache& c = cache.layers[l];
    const std::string p = "layers." + std::to_string(l);
    // dx holds dLoss/dx'; x' = h + Ffn(Norm2(h)).
    if (IsMoeLayer(model_, l)) {
      --moe;
      const int k = c.route.k, E = c.route.experts;
      std::vector<Real> d_gate(static_cast<size_t>(N) * k);
      RETURN_IF_ERROR(experts->Backward(moe, pass.micro_batch, N, dx.data(),
                                        dn2.data(), d_gate.data()));
      std::vector<Real>& dx_router = cache.dx_router;
      dx_router.resize(nd);
      std::vector<Real> dw_router(static_cast<size_t>(d) * E);
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
                  activation_, &c.ffn, dx.data(), dn2.data(),
                  Grad(grads, p + ".ffn.w1"), Grad(grads, p + ".ffn.b1"),
                  Grad(grads, p + ".ffn.w2"), Grad(grads, p + ".ffn.b2"));
    }
    NormBackward(params, p + ".norm2", c.h.data(), dn2.data(), N, dh.data(),
                 grads);
    AddInto(dx, &dh);  // The residual path.
    // h = x + Attention(Norm1(x)).
    std::vector<Real>& dn1 = dn;
    AttentionBackward(c.n1.data(), Param(params, p + ".attn.wq"),
                      Param(params, p + ".attn.wk"),
                      Param(params, p + ".attn.wv"),
                      Param(params, p + ".attn.wo"), B, L, d, heads, rotary(),
                      &c.attn, dh.data(), dn1.data(),
                      Grad(grads, p + ".attn.wq"), Grad(grads, p + ".attn.wk"),
                      Grad(grads, p + ".attn.wv"), Grad(grads, p + ".attn.wo"));
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
