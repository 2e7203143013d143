#include "expert_worker/shard_compute.h"

#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "common/finite.h"
#include "common/metrics.h"
#include "common/random.h"

namespace switchyard::expert_worker {

using transport::Message;
using transport::MessageKind;

namespace {

Counter* OptimizerMicros() {
  static Counter* c = MetricsRegistry::Global().GetCounter(
      "switchyard_worker_optimizer_microseconds_total");
  return c;
}

// Concatenates rows of `parts` (each (T_i, cols)) into one (sum T_i, cols),
// in a buffer from `pool`; a single part is returned as it is.
StatusOr<Tensor> ConcatRows(BufferPool& pool,
                            const std::vector<const Tensor*>& parts,
                            int64_t cols) {
  if (parts.size() == 1) return *parts.front();
  int64_t rows = 0;
  for (const Tensor* p : parts) rows += p->dim(0);
  ASSIGN_OR_RETURN(Tensor out, pool.Take(DType::kF32, {rows, cols}));
  char* dst = static_cast<char*>(out.data());
  for (const Tensor* p : parts) {
    std::memcpy(dst, p->data(), p->num_bytes());
    dst += p->num_bytes();
  }
  return out;
}

// Expert dropout's multipliers for one request's activations (T, f): unit
// (row, column) of expert shard (layer, expert, shard) is dropped with
// probability model.expert_dropout, from (seed, step, rank, micro-batch,
// layer, expert, row, global column) so that a forward and its backward,
// and two runs, agree. Empty when there is no dropout.
std::vector<float> ExpertDropoutKeep(const config::SwitchyardConfig& config,
                                     const transport::WireHeader& h,
                                     int64_t tokens, int64_t f) {
  const double rate = config.model().expert_dropout();
  if (rate <= 0) return {};
  constexpr uint64_t kTagExpertDropout = 41;
  const float scale = static_cast<float>(1.0 / (1.0 - rate));
  std::vector<float> keep(static_cast<size_t>(tokens * f));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < f; ++c) {
      const double u = RandomUniform(
          config.training().seed(),
          {kTagExpertDropout, static_cast<uint64_t>(h.step),
           static_cast<uint64_t>(h.trainer_rank),
           static_cast<uint64_t>(h.micro_batch), static_cast<uint64_t>(h.layer),
           static_cast<uint64_t>(h.expert), static_cast<uint64_t>(t),
           static_cast<uint64_t>(h.shard * f + c)});
      keep[t * f + c] = u < rate ? 0.0f : scale;
    }
  }
  return keep;
}

}  // namespace

ShardCompute::ShardCompute(const config::SwitchyardConfig& config,
                           const ExpertShape& shape0, const ExpertShape& shape,
                           Gemm* gemm, const Optimizer* optimizer,
                           BufferPool* pool)
    : config_(config),
      ffn0_(std::make_unique<ExpertFfn>(shape0, gemm)),
      ffn_(std::make_unique<ExpertFfn>(shape, gemm)),
      optimizer_(optimizer),
      pool_(pool) {}

Status ShardCompute::Forward(const Message& request, ExpertShard* shard,
                             Tensor* y) const {
  const auto& h = request.header;
  const bool train =
      h.kind == static_cast<uint8_t>(MessageKind::kExpertForward);
  const auto key = std::make_tuple(h.step, h.trainer_rank, h.micro_batch);
  if (train && shard->activations.count(key)) {
    return AlreadyExistsError("duplicate forward for " +
                              transport::DescribeHeader(h));
  }
  ASSIGN_OR_RETURN(Tensor x, pool_->Converted(request.payload, DType::kF32));
  const ExpertFfn& f = ffn(shard->id.shard);
  const int64_t tokens = x.dim(0);
  ASSIGN_OR_RETURN(
      Tensor hidden,
      pool_->Take(DType::kF32,
                  {tokens, f.shape().gates() * f.shape().d_ff_shard}));
  ASSIGN_OR_RETURN(*y, pool_->Take(DType::kF32, {tokens, x.dim(1)}));
  const std::vector<float> keep =
      train ? ExpertDropoutKeep(config_, h, tokens, f.shape().d_ff_shard)
            : std::vector<float>();
  RETURN_IF_ERROR(f.Forward(shard->params, x,
                            keep.empty() ? nullptr : keep.data(), &hidden, y));
  if (!train) return OkStatus();  // Evaluation keeps nothing.
  shard->activations[key] = {std::move(x), std::move(hidden)};
  shard->tokens += tokens;
  return OkStatus();
}

Status ShardCompute::Backward(const Message& request, ExpertShard* shard,
                              Tensor* dx) const {
  const auto& h = request.header;
  const auto key = std::make_tuple(h.step, h.trainer_rank, h.micro_batch);
  auto it = shard->activations.find(key);
  if (it == shard->activations.end()) {
    return FailedPreconditionError("backward without a forward: " +
                                   transport::DescribeHeader(h));
  }
  ASSIGN_OR_RETURN(Tensor dy, pool_->Converted(request.payload, DType::kF32));
  const Tensor& x = it->second.first;
  const Tensor& hidden = it->second.second;
  if (dy.dim(0) != x.dim(0)) {
    return InvalidArgumentError(
        "backward carries " + std::to_string(dy.dim(0)) +
        " tokens, its forward had " + std::to_string(x.dim(0)));
  }
  const ExpertFfn& f = ffn(shard->id.shard);
  ASSIGN_OR_RETURN(Tensor dh, pool_->Take(DType::kF32, hidden.shape()));
  ASSIGN_OR_RETURN(Tensor a,
                   pool_->Take(DType::kF32, {x.dim(0), f.shape().d_ff_shard}));
  ASSIGN_OR_RETURN(*dx, pool_->Take(DType::kF32, x.shape()));
  const std::vector<float> keep =
      ExpertDropoutKeep(config_, h, x.dim(0), f.shape().d_ff_shard);
  RETURN_IF_ERROR(f.BackwardInput(shard->params, hidden, dy,
                                  keep.empty() ? nullptr : keep.data(), &dh, &a,
                                  dx));
  shard->contributions[{h.trainer_rank, h.micro_batch}] = {
      x, std::move(a), std::move(dh), std::move(dy)};
  shard->activations.erase(it);
  return OkStatus();
}

Status ShardCompute::Gradients(ExpertShard* shard) const {
  shard->activations.clear();  // Forwards never followed by a backward.
  shard->grads_ready = false;
  if (shard->contributions.empty()) return OkStatus();  // No tokens.
  const ExpertFfn& f = ffn(shard->id.shard);
  std::vector<const Tensor*> xs, as, dhs, dys;
  for (const auto& [key, c] : shard->contributions) {
    xs.push_back(&c.x);
    as.push_back(&c.a);
    dhs.push_back(&c.dh);
    dys.push_back(&c.dy);
  }
  const int64_t gf = f.shape().gates() * f.shape().d_ff_shard;
  const int64_t d = f.shape().d_model;
  // One GEMM over every contribution, in (rank, micro-batch) order; it
  // overwrites the previous step's gradient.
  ASSIGN_OR_RETURN(Tensor x, ConcatRows(*pool_, xs, d));
  ASSIGN_OR_RETURN(Tensor a, ConcatRows(*pool_, as, f.shape().d_ff_shard));
  ASSIGN_OR_RETURN(Tensor dh, ConcatRows(*pool_, dhs, gf));
  ASSIGN_OR_RETURN(Tensor dy, ConcatRows(*pool_, dys, d));
  RETURN_IF_ERROR(f.ComputeGrads(x, a, dh, dy, &shard->grads));
  shard->contributions.clear();
  const std::string name = shard->id.ToString();
  const ExpertParams& g = shard->grads;
  RETURN_IF_ERROR(CheckFinite(g.w1, "the gradient of " + name + " w1"));
  RETURN_IF_ERROR(CheckFinite(g.w2, "the gradient of " + name + " w2"));
  RETURN_IF_ERROR(CheckFinite(g.b1, "the gradient of " + name + " b1"));
  RETURN_IF_ERROR(CheckFinite(g.b2, "the gradient of " + name + " b2"));
  shard->grads_ready = true;
  return OkStatus();
}

Status ShardCompute::Apply(int64_t step, ExpertShard* shard) const {
  if (!shard->grads_ready) return OkStatus();
  ScopedMicros timed(OptimizerMicros());
  shard->grads_ready = false;
  const ExpertFfn& f = ffn(shard->id.shard);
  ExpertParams& p = shard->params;
  const ExpertParams& g = shard->grads;
  // bf16 compute: the sweep that changes the weights also refreshes their
  // bf16 copies (one pass over them, not two).
  const bool bf16 = f.shape().compute_dtype == DType::kBF16;
  if (bf16) RETURN_IF_ERROR(p.MakeBf16Storage());
  Status weights = optimizer_->Apply(step, g.w1, &p.w1, &shard->w1,
                                     bf16 ? &p.w1_bf16 : nullptr);
  if (weights.ok()) {
    weights = optimizer_->Apply(step, g.w2, &p.w2, &shard->w2,
                                bf16 ? &p.w2_bf16 : nullptr);
  }
  if (!weights.ok()) {
    // Copies not written are dropped: each product converts the weights.
    p.w1_bf16 = Tensor();
    p.w2_bf16 = Tensor();
    return weights;
  }
  if (!p.b1.empty()) {
    RETURN_IF_ERROR(optimizer_->Apply(step, g.b1, &p.b1, &shard->b1));
  }
  if (!p.b2.empty()) {
    RETURN_IF_ERROR(optimizer_->Apply(step, g.b2, &p.b2, &shard->b2));
  }
  return OkStatus();
}

Status ShardCompute::Push(const transport::WireHeader& h, const Tensor& grad,
                          DenseShard* shard) {
  if (grad.empty() || grad.dtype() != DType::kF32 ||
      grad.shape() != shard->params.shape()) {
    return InvalidArgumentError("dense gradient " +
                                (grad.empty() ? "<none>" : grad.DebugString()) +
                                " for D" + std::to_string(h.shard) +
                                " must be " + shard->params.DebugString());
  }
  RETURN_IF_ERROR(CheckFinite(grad, "the dense gradient of rank " +
                                        std::to_string(h.trainer_rank) +
                                        " for D" + std::to_string(h.shard) +
                                        " at step " + std::to_string(h.step)));
  if (!shard->pushes.emplace(h.trainer_rank, grad).second) {
    return AlreadyExistsError("duplicate dense push: " +
                              transport::DescribeHeader(h));
  }
  return OkStatus();
}

Status ShardCompute::Gradients(DenseShard* shard) const {
  shard->grad = Tensor();
  if (shard->pushes.empty()) return OkStatus();
  // Sum in rank order (std::map), whatever order the pushes came in.
  Tensor sum = shard->pushes.begin()->second.Clone();
  for (auto it = std::next(shard->pushes.begin()); it != shard->pushes.end();
       ++it) {
    float* acc = sum.f32();
    const float* g = it->second.f32();
    for (int64_t i = 0; i < sum.num_elements(); ++i) acc[i] += g[i];
  }
  shard->pushes.clear();
  RETURN_IF_ERROR(CheckFinite(
      sum, "the summed gradient of D" + std::to_string(shard->index)));
  shard->grad = std::move(sum);
  return OkStatus();
}

Status ShardCompute::Apply(int64_t step, DenseShard* shard) const {
  if (shard->grad.empty()) return OkStatus();
  ScopedMicros timed(OptimizerMicros());
  const Tensor grad = std::move(shard->grad);
  shard->grad = Tensor();
  return optimizer_->Apply(step, grad, &shard->params, &shard->state);
}

}  // namespace switchyard::expert_worker
