#include "expert_worker/shard_compute.h"

#include <cstring>
#include <string>
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

// Concatenates rows of `parts` (each (T_i, cols), or empty: no rows) into
// one (sum T_i, cols), in a buffer from `pool`; a single part with rows is
// returned as it is; no rows at all: an empty tensor.
StatusOr<Tensor> ConcatRows(BufferPool& pool,
                            const std::vector<const Tensor*>& parts,
                            int64_t cols) {
  int64_t rows = 0;
  const Tensor* only = nullptr;
  int with_rows = 0;
  for (const Tensor* p : parts) {
    if (p->empty() || p->dim(0) == 0) continue;
    rows += p->dim(0);
    only = p;
    ++with_rows;
  }
  if (with_rows == 0) return Tensor();
  if (with_rows == 1) return *only;
  ASSIGN_OR_RETURN(Tensor out, pool.Take(DType::kF32, {rows, cols}));
  char* dst = static_cast<char*>(out.data());
  for (const Tensor* p : parts) {
    if (p->empty()) continue;
    std::memcpy(dst, p->data(), p->num_bytes());
    dst += p->num_bytes();
  }
  return out;
}

// The payloads of `requests` as fp32 (empty where none) and their rows.
Status Payloads(BufferPool& pool,
                const std::vector<const transport::Message*>& requests,
                std::vector<Tensor>* f32, std::vector<int64_t>* rows) {
  for (const transport::Message* m : requests) {
    if (m->payload.empty()) {
      f32->emplace_back();
      rows->push_back(0);
      continue;
    }
    ASSIGN_OR_RETURN(Tensor t, pool.Converted(m->payload, DType::kF32));
    rows->push_back(t.dim(0));
    f32->push_back(std::move(t));
  }
  return OkStatus();
}

// `out`'s rows split by `rows` (views sharing its storage; empty where a
// request had none).
StatusOr<std::vector<Tensor>> SplitRows(const Tensor& out,
                                        const std::vector<int64_t>& rows) {
  std::vector<Tensor> parts;
  int64_t begin = 0;
  for (int64_t n : rows) {
    if (n == 0) {
      parts.emplace_back();
      continue;
    }
    ASSIGN_OR_RETURN(Tensor part, out.Slice(begin, begin + n));
    parts.push_back(std::move(part));
    begin += n;
  }
  return parts;
}

// Expert dropout's multipliers for one micro-batch's activations (sum of
// rows, f), rank r's rows after rank r - 1's: unit (row, column) of expert
// shard (layer, expert, shard) is dropped with probability
// model.expert_dropout, from (seed, step, rank, micro-batch, layer, expert,
// row within the rank's, global column) so that a forward and its
// backward, and two runs, agree. Empty when there is no dropout.
std::vector<float> ExpertDropoutKeep(const config::SwitchyardConfig& config,
                                     const transport::WireHeader& h,
                                     const std::vector<int64_t>& rows,
                                     int64_t f) {
  const double rate = config.model().expert_dropout();
  if (rate <= 0) return {};
  constexpr uint64_t kTagExpertDropout = 41;
  const float scale = static_cast<float>(1.0 / (1.0 - rate));
  std::vector<float> keep;
  for (size_t rank = 0; rank < rows.size(); ++rank) {
    for (int64_t t = 0; t < rows[rank]; ++t) {
      for (int64_t c = 0; c < f; ++c) {
        const double u = RandomUniform(
            config.training().seed(),
            {kTagExpertDropout, static_cast<uint64_t>(h.step),
             static_cast<uint64_t>(rank), static_cast<uint64_t>(h.micro_batch),
             static_cast<uint64_t>(h.layer), static_cast<uint64_t>(h.expert),
             static_cast<uint64_t>(t), static_cast<uint64_t>(h.shard * f + c)});
        keep.push_back(u < rate ? 0.0f : scale);
      }
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

Status ShardCompute::CheckNew(const transport::WireHeader& h,
                              const ExpertShard& shard) {
  const bool forward =
      h.kind == static_cast<uint8_t>(MessageKind::kExpertForward);
  const bool had_forward = shard.activations.count({h.step, h.micro_batch});
  const bool had_backward = shard.contributions.count(h.micro_batch);
  if (forward ? had_forward || had_backward : had_backward) {
    return AlreadyExistsError("duplicate request: " +
                              transport::DescribeHeader(h));
  }
  if (!forward && !had_forward) {
    return FailedPreconditionError("backward without a forward: " +
                                   transport::DescribeHeader(h));
  }
  return OkStatus();
}

Status ShardCompute::Forward(const std::vector<const Message*>& requests,
                             ExpertShard* shard,
                             std::vector<Tensor>* outs) const {
  const auto& h = requests.front()->header;
  const bool train =
      h.kind == static_cast<uint8_t>(MessageKind::kExpertForward);
  if (train) RETURN_IF_ERROR(CheckNew(h, *shard));
  std::vector<Tensor> xs;
  std::vector<int64_t> rows;
  RETURN_IF_ERROR(Payloads(*pool_, requests, &xs, &rows));
  std::vector<const Tensor*> parts;
  for (const Tensor& x : xs) parts.push_back(&x);
  const ExpertFfn& f = ffn(shard->id.shard);
  const int64_t d = f.shape().d_model;
  ASSIGN_OR_RETURN(Tensor x, ConcatRows(*pool_, parts, d));
  ExpertShard::Activation kept{x, Tensor(), rows};
  if (!x.empty()) {
    const int64_t tokens = x.dim(0);
    ASSIGN_OR_RETURN(
        kept.h, pool_->Take(DType::kF32, {tokens, f.shape().gates() *
                                                      f.shape().d_ff_shard}));
    ASSIGN_OR_RETURN(Tensor y, pool_->Take(DType::kF32, {tokens, d}));
    const std::vector<float> keep =
        train ? ExpertDropoutKeep(config_, h, rows, f.shape().d_ff_shard)
              : std::vector<float>();
    RETURN_IF_ERROR(f.Forward(
        shard->params, x, keep.empty() ? nullptr : keep.data(), &kept.h, &y));
    ASSIGN_OR_RETURN(*outs, SplitRows(y, rows));
  } else {
    outs->assign(requests.size(), Tensor());
  }
  if (train) {
    shard->activations[{h.step, h.micro_batch}] = std::move(kept);
  }
  return OkStatus();
}

Status ShardCompute::Backward(const std::vector<const Message*>& requests,
                              ExpertShard* shard,
                              std::vector<Tensor>* outs) const {
  const auto& h = requests.front()->header;
  RETURN_IF_ERROR(CheckNew(h, *shard));
  auto it = shard->activations.find({h.step, h.micro_batch});
  const ExpertShard::Activation& kept = it->second;
  std::vector<Tensor> dys;
  std::vector<int64_t> rows;
  RETURN_IF_ERROR(Payloads(*pool_, requests, &dys, &rows));
  for (size_t r = 0; r < rows.size(); ++r) {
    if (rows[r] != kept.rows[r]) {
      return InvalidArgumentError("the backward of rank " + std::to_string(r) +
                                  " carries " + std::to_string(rows[r]) +
                                  " tokens, its forward had " +
                                  std::to_string(kept.rows[r]) + " (" +
                                  transport::DescribeHeader(h) + ")");
    }
  }
  std::vector<const Tensor*> parts;
  for (const Tensor& dy : dys) parts.push_back(&dy);
  const ExpertFfn& f = ffn(shard->id.shard);
  ASSIGN_OR_RETURN(Tensor dy, ConcatRows(*pool_, parts, f.shape().d_model));
  ExpertShard::Contribution c{kept.x, Tensor(), Tensor(), dy};
  if (!dy.empty()) {
    ASSIGN_OR_RETURN(c.dh, pool_->Take(DType::kF32, kept.h.shape()));
    ASSIGN_OR_RETURN(
        c.a, pool_->Take(DType::kF32, {dy.dim(0), f.shape().d_ff_shard}));
    ASSIGN_OR_RETURN(Tensor dx, pool_->Take(DType::kF32, kept.x.shape()));
    const std::vector<float> keep =
        ExpertDropoutKeep(config_, h, rows, f.shape().d_ff_shard);
    RETURN_IF_ERROR(f.BackwardInput(shard->params, kept.h, dy,
                                    keep.empty() ? nullptr : keep.data(), &c.dh,
                                    &c.a, &dx));
    ASSIGN_OR_RETURN(*outs, SplitRows(dx, rows));
  } else {
    outs->assign(requests.size(), Tensor());
  }
  shard->contributions[h.micro_batch] = std::move(c);
  shard->activations.erase(it);
  return OkStatus();
}

Status ShardCompute::ComputeGradients(ExpertShard* shard, bool* tokens) const {
  *tokens = false;
  const ExpertFfn& f = ffn(shard->id.shard);
  std::vector<const Tensor*> xs, as, dhs, dys;
  for (const auto& [micro_batch, c] : shard->contributions) {
    if (c.dy.empty()) continue;  // No rows.
    xs.push_back(&c.x);
    as.push_back(&c.a);
    dhs.push_back(&c.dh);
    dys.push_back(&c.dy);
  }
  if (xs.empty()) return OkStatus();  // No tokens.
  *tokens = true;
  const int64_t gf = f.shape().gates() * f.shape().d_ff_shard;
  const int64_t d = f.shape().d_model;
  // One GEMM over every contribution, in (micro-batch, rank) order; it
  // overwrites the previous step's gradient.
  ASSIGN_OR_RETURN(Tensor x, ConcatRows(*pool_, xs, d));
  ASSIGN_OR_RETURN(Tensor a, ConcatRows(*pool_, as, f.shape().d_ff_shard));
  ASSIGN_OR_RETURN(Tensor dh, ConcatRows(*pool_, dhs, gf));
  ASSIGN_OR_RETURN(Tensor dy, ConcatRows(*pool_, dys, d));
  RETURN_IF_ERROR(f.ComputeGrads(x, a, dh, dy, &shard->grads));
  const std::string name = shard->id.ToString();
  const ExpertParams& g = shard->grads;
  RETURN_IF_ERROR(CheckFinite(g.w1, "the gradient of " + name + " w1"));
  RETURN_IF_ERROR(CheckFinite(g.w2, "the gradient of " + name + " w2"));
  RETURN_IF_ERROR(CheckFinite(g.b1, "the gradient of " + name + " b1"));
  RETURN_IF_ERROR(CheckFinite(g.b2, "the gradient of " + name + " b2"));
  return OkStatus();
}

Status ShardCompute::Gradients(ExpertShard* shard) const {
  shard->activations.clear();  // Forwards never followed by a backward.
  shard->grads_ready = false;
  bool tokens = false;
  Status s;
  if (shard->grads_early) {
    shard->grads_early = false;
    tokens = shard->early_tokens;
    s = shard->early_check;
  } else {
    s = ComputeGradients(shard, &tokens);
  }
  shard->contributions.clear();
  RETURN_IF_ERROR(s);
  shard->grads_ready = tokens;
  return OkStatus();
}

bool ShardCompute::GradientsDue(const ExpertShard& shard) const {
  return !shard.grads_early && !shard.grads_ready &&
         shard.activations.empty() &&
         static_cast<int>(shard.contributions.size()) ==
             config_.training().micro_batches();
}

void ShardCompute::EarlyGradients(ExpertShard* shard) const {
  shard->early_check = ComputeGradients(shard, &shard->early_tokens);
  shard->grads_early = true;
  // The inputs go; the micro-batches stay listed, so that a repeated
  // request is still refused (CheckNew).
  for (auto& [micro_batch, c] : shard->contributions) c = {};
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
