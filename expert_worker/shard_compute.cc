#include "expert_worker/shard_compute.h"

#include <glog/logging.h>

#include <algorithm>
#include <cstring>
#include <iomanip>
#include <optional>
#include <string>
#include <vector>

#include "common/finite.h"
#include "common/metrics.h"
#include "common/random.h"
#include "expert_worker/replication.h"

namespace switchyard::expert_worker {

using transport::Message;
using transport::MessageKind;

namespace {

Counter* OptimizerMicros() {
  static Counter* c = MetricsRegistry::Global().GetCounter(
      "switchyard_worker_optimizer_microseconds_total");
  return c;
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

// The shard's chunks (its replicas; 1 without replication), read from its
// plan.
StatusOr<int> Chunks(const ExpertShard& shard) {
  if (shard.repl.empty()) return 1;
  ASSIGN_OR_RETURN(ReplicationState plan,
                   ReadReplication(shard.repl, shard.id.ToString()));
  return plan.replicas;
}

// What a copy gets for chunk `r`'s forward: its rows of x, each followed
// by its `f` expert-dropout keep multipliers when there are any.
StatusOr<Tensor> ChunkInput(BufferPool& pool, const Tensor& x,
                            const std::vector<float>& keep, int64_t f,
                            RowRange r) {
  if (keep.empty()) return x.Slice(r.begin, r.end);
  const int64_t d = x.dim(1);
  ASSIGN_OR_RETURN(Tensor out, pool.Take(DType::kF32, {r.size(), d + f}));
  for (int64_t i = 0; i < r.size(); ++i) {
    float* row = out.f32() + i * (d + f);
    std::memcpy(row, x.f32() + (r.begin + i) * d, d * sizeof(float));
    std::memcpy(row + d, keep.data() + (r.begin + i) * f, f * sizeof(float));
  }
  return out;
}

// into += from, element by element (both fp32, the same shape, or empty).
void AddInto(const Tensor& from, Tensor* into) {
  if (into->empty()) return;
  float* acc = into->f32();
  const float* add = from.f32();
  for (int64_t i = 0; i < into->num_elements(); ++i) acc[i] += add[i];
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
  if (!forward && !shard.activations.at({h.step, h.micro_batch}).answered) {
    return FailedPreconditionError(
        "backward before its forward was answered: " +
        transport::DescribeHeader(h));
  }
  return OkStatus();
}

namespace {

// Rows `r` of a forward computed here: x's into h's and y's.
Status ForwardRows(const ExpertFfn& f, const ExpertShard& shard,
                   const Tensor& x, const std::vector<float>& keep, RowRange r,
                   Tensor* h, Tensor* y) {
  const int64_t ff = f.shape().d_ff_shard;
  ASSIGN_OR_RETURN(Tensor xc, x.Slice(r.begin, r.end));
  ASSIGN_OR_RETURN(Tensor hc, h->Slice(r.begin, r.end));
  ASSIGN_OR_RETURN(Tensor yc, y->Slice(r.begin, r.end));
  return f.Forward(shard.params, xc,
                   keep.empty() ? nullptr : keep.data() + r.begin * ff, &hc,
                   &yc);
}

// Whether `got` (a copy's answer for rows `r`) is what the chunk needs:
// fp32 (r.size(), d).
bool Fits(const StatusOr<Tensor>& got, RowRange r, int64_t d) {
  return got.ok() && !got->empty() && got->dtype() == DType::kF32 &&
         got->shape() == std::vector<int64_t>{r.size(), d};
}

// The end of a chunked forward or backward: the rows of every chunk `sent`
// to a copy (`replicas`' Wait; null when none was) into their rows of
// `*out` (tokens, d), marked in `*remote` (an entry per chunk); a chunk its
// copy failed to give computed here by `here(chunk, rows)`. Then `*out`
// split into the ranks' `rows`.
Status TakeCopiesRows(
    ReplicaClient* replicas,
    const std::vector<std::shared_ptr<ReplicaClient::Pending>>& sent,
    const std::vector<int64_t>& rows,
    const std::function<Status(int, RowRange)>& here, Tensor* out,
    std::vector<uint8_t>* remote, std::vector<Tensor>* outs) {
  const int chunks = static_cast<int>(sent.size());
  const int64_t tokens = out->dim(0), d = out->dim(1);
  remote->assign(chunks, 0);
  for (int c = 1; c < chunks; ++c) {
    if (sent[c] == nullptr) continue;
    const RowRange r = ChunkRows(tokens, chunks, c);
    StatusOr<Tensor> got = replicas->Wait(*sent[c]);
    if (Fits(got, r, d)) {
      std::memcpy(out->f32() + r.begin * d, got->data(), got->num_bytes());
      (*remote)[c] = 1;
    } else {
      RETURN_IF_ERROR(here(c, r));
    }
  }
  ASSIGN_OR_RETURN(*outs, SplitRows(*out, rows));
  return OkStatus();
}

}  // namespace

bool ShardCompute::Unfinished::ready() const {
  for (const auto& p : waiting) {
    if (!ReplicaClient::Answered(*p)) return false;
  }
  return true;
}

ReplicaClient::Deadline ShardCompute::Unfinished::due() const {
  ReplicaClient::Deadline last{};
  for (const auto& p : waiting) {
    last = std::max(last, ReplicaClient::DeadlineOf(*p));
  }
  return last;
}

Status ShardCompute::Forward(const std::vector<const Message*>& requests,
                             ExpertShard* shard, std::vector<Tensor>* outs,
                             std::optional<Unfinished>* later) const {
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
  const std::pair<int64_t, int32_t> key{h.step, h.micro_batch};
  ExpertShard::Activation kept{x, Tensor(), rows, {}};
  if (x.empty()) {
    outs->assign(requests.size(), Tensor());
    if (train) shard->activations[key] = std::move(kept);
    return OkStatus();
  }
  ASSIGN_OR_RETURN(const int chunks, Chunks(*shard));
  const int64_t tokens = x.dim(0);
  const int64_t ff = f.shape().d_ff_shard;
  ASSIGN_OR_RETURN(kept.h,
                   pool_->Take(DType::kF32, {tokens, f.shape().gates() * ff}));
  ASSIGN_OR_RETURN(Tensor y, pool_->Take(DType::kF32, {tokens, d}));
  std::vector<float> keep =
      train ? ExpertDropoutKeep(config_, h, rows, ff) : std::vector<float>();
  // Chunk by chunk, each its own product: the chunks with a copy
  // elsewhere go there first, this worker computes the others meanwhile,
  // then (in `finish`) any a copy failed to answer.
  std::vector<std::shared_ptr<ReplicaClient::Pending>> sent(chunks);
  if (train && replicas_ != nullptr) {
    const auto deadline = replicas_->NewDeadline();
    shard->chunk_epoch = h.epoch;
    shard->chunk_step = h.step;
    replicas_->BeginStep(shard->id, h.epoch, h.step, chunks);
    for (int c = 1; c < chunks; ++c) {
      const RowRange r = ChunkRows(tokens, chunks, c);
      if (r.size() == 0) continue;
      ASSIGN_OR_RETURN(Tensor xc, ChunkInput(*pool_, x, keep, ff, r));
      sent[c] = replicas_->Start(MessageKind::kReplicaForward, shard->id,
                                 shard->params, h.epoch, h.step, h.micro_batch,
                                 c, std::move(xc), deadline);
    }
  }
  for (int c = 0; c < chunks; ++c) {
    const RowRange r = ChunkRows(tokens, chunks, c);
    if (r.size() > 0 && sent[c] == nullptr) {
      RETURN_IF_ERROR(ForwardRows(f, *shard, x, keep, r, &kept.h, &y));
    }
  }
  // Kept now, so that a repeated forward, or a backward, is refused while
  // copies compute.
  if (train) {
    ExpertShard::Activation& unanswered = shard->activations[key] = kept;
    unanswered.answered = false;
  }
  auto finish = [this, shard, &f, key, train, kept = std::move(kept),
                 keep = std::move(keep), y,
                 sent](std::vector<Tensor>* outs) mutable -> Status {
    const Status s = TakeCopiesRows(
        replicas_, sent, kept.rows,
        [&](int, RowRange r) {
          return ForwardRows(f, *shard, kept.x, keep, r, &kept.h, &y);
        },
        &y, &kept.remote, outs);
    if (!train) return s;
    if (s.ok()) {
      shard->activations[key] = std::move(kept);
    } else {
      shard->activations.erase(key);
    }
    return s;
  };
  return Conclude(sent, std::move(finish), outs, later);
}

Status ShardCompute::Conclude(
    const std::vector<std::shared_ptr<ReplicaClient::Pending>>& sent,
    std::function<Status(std::vector<Tensor>*)> finish,
    std::vector<Tensor>* outs, std::optional<Unfinished>* later) {
  Unfinished rest{{}, std::move(finish)};
  for (const auto& p : sent) {
    if (p != nullptr) rest.waiting.push_back(p);
  }
  if (later == nullptr || rest.waiting.empty()) return rest.finish(outs);
  *later = std::move(rest);
  return OkStatus();
}

Status ShardCompute::Backward(const std::vector<const Message*>& requests,
                              ExpertShard* shard, std::vector<Tensor>* outs,
                              std::optional<Unfinished>* later) const {
  const auto& h = requests.front()->header;
  RETURN_IF_ERROR(CheckNew(h, *shard));
  const std::pair<int64_t, int32_t> key{h.step, h.micro_batch};
  const int32_t micro_batch = h.micro_batch;
  // A copy: the activation goes once the backward is done.
  const ExpertShard::Activation kept = shard->activations.at(key);
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
  ExpertShard::Contribution c{kept.x, Tensor(), Tensor(), dy, {}, {}};
  if (dy.empty()) {
    outs->assign(requests.size(), Tensor());
    shard->contributions[micro_batch] = std::move(c);
    shard->activations.erase(key);
    return OkStatus();
  }
  ASSIGN_OR_RETURN(const int chunks, Chunks(*shard));
  const int64_t ff = f.shape().d_ff_shard;
  ASSIGN_OR_RETURN(c.dh, pool_->Take(DType::kF32, kept.h.shape()));
  ASSIGN_OR_RETURN(c.a, pool_->Take(DType::kF32, {dy.dim(0), ff}));
  ASSIGN_OR_RETURN(Tensor dx, pool_->Take(DType::kF32, kept.x.shape()));
  std::vector<float> keep = ExpertDropoutKeep(config_, h, rows, ff);
  const int64_t d = f.shape().d_model;
  // A chunk whose forward ran on its copy goes back there; the others,
  // and any the copy fails, run here (a remote forward's h computed
  // again first).
  const auto here = [this, &f, shard, ff, d](
                        const ExpertShard::Activation& kept,
                        const std::vector<float>& keep, int chunk, RowRange r,
                        ExpertShard::Contribution* c, Tensor* dx) -> Status {
    const bool remote =
        chunk < static_cast<int>(kept.remote.size()) && kept.remote[chunk];
    ASSIGN_OR_RETURN(Tensor hc, kept.h.Slice(r.begin, r.end));
    const float* keep_c = keep.empty() ? nullptr : keep.data() + r.begin * ff;
    if (remote) {
      ASSIGN_OR_RETURN(Tensor xc, kept.x.Slice(r.begin, r.end));
      ASSIGN_OR_RETURN(Tensor yc, pool_->Take(DType::kF32, {r.size(), d}));
      RETURN_IF_ERROR(f.Forward(shard->params, xc, keep_c, &hc, &yc));
    }
    ASSIGN_OR_RETURN(Tensor dyc, c->dy.Slice(r.begin, r.end));
    ASSIGN_OR_RETURN(Tensor dhc, c->dh.Slice(r.begin, r.end));
    ASSIGN_OR_RETURN(Tensor ac, c->a.Slice(r.begin, r.end));
    ASSIGN_OR_RETURN(Tensor dxc, dx->Slice(r.begin, r.end));
    return f.BackwardInput(shard->params, hc, dyc, keep_c, &dhc, &ac, &dxc);
  };
  const int64_t tokens = dy.dim(0);
  std::vector<std::shared_ptr<ReplicaClient::Pending>> sent(chunks);
  if (replicas_ != nullptr) {
    const auto deadline = replicas_->NewDeadline();
    for (int k = 1; k < chunks && k < static_cast<int>(kept.remote.size());
         ++k) {
      if (!kept.remote[k]) continue;
      const RowRange r = ChunkRows(tokens, chunks, k);
      ASSIGN_OR_RETURN(Tensor dyc, dy.Slice(r.begin, r.end));
      sent[k] = replicas_->Start(MessageKind::kReplicaBackward, shard->id,
                                 shard->params, h.epoch, h.step, h.micro_batch,
                                 k, std::move(dyc), deadline);
    }
  }
  for (int k = 0; k < chunks; ++k) {
    const RowRange r = ChunkRows(tokens, chunks, k);
    if (r.size() > 0 && sent[k] == nullptr) {
      RETURN_IF_ERROR(here(kept, keep, k, r, &c, &dx));
    }
  }
  // Kept now, so that a repeated backward is refused while copies
  // compute; the activation stays until then, so the shard's gradient is
  // not due before.
  shard->contributions[micro_batch] = c;
  auto finish = [this, shard, here, key, micro_batch, kept,
                 keep = std::move(keep), c = std::move(c), dx,
                 sent](std::vector<Tensor>* outs) mutable -> Status {
    const Status s = TakeCopiesRows(
        replicas_, sent, kept.rows,
        [&](int k, RowRange r) { return here(kept, keep, k, r, &c, &dx); }, &dx,
        &c.remote, outs);
    if (!s.ok()) {
      shard->contributions.erase(micro_batch);
      return s;
    }
    // A share its copy fails to give is computed here again, with the
    // same multipliers.
    if (std::count(c.remote.begin(), c.remote.end(), 1) > 0) {
      c.keep = std::move(keep);
    }
    shard->contributions[micro_batch] = std::move(c);
    shard->activations.erase(key);
    return OkStatus();
  };
  return Conclude(sent, std::move(finish), outs, later);
}

Status ShardCompute::ComputeGradients(ExpertShard* shard, bool* tokens) const {
  *tokens = false;
  shard->step_tokens = 0;
  ASSIGN_OR_RETURN(const int chunks, Chunks(*shard));
  const ExpertFfn& f = ffn(shard->id.shard);
  const int64_t ff = f.shape().d_ff_shard;
  const int64_t gf = f.shape().gates() * ff;
  const int64_t d = f.shape().d_model;
  for (const auto& [micro_batch, c] : shard->contributions) {
    if (!c.dy.empty()) shard->step_tokens += c.dy.dim(0);
  }
  if (shard->step_tokens == 0) return OkStatus();  // No tokens.
  *tokens = true;
  // One GEMM per chunk over its rows of every micro-batch, in (micro-batch,
  // rank) order; the chunks' shares (those with rows) summed in chunk
  // order. The first overwrites the previous step's gradient.
  bool first = true;
  // Adds a chunk's share to the gradient (the first share is it).
  const auto add = [&](const ExpertParams& from) {
    ExpertParams& g = shard->grads;
    AddInto(from.w1, &g.w1);
    AddInto(from.b1, &g.b1);
    AddInto(from.w2, &g.w2);
    AddInto(from.b2, &g.b2);
  };
  ExpertParams& share = shard->share;
  if (chunks > 1 && share.w1.empty()) {
    ASSIGN_OR_RETURN(share, ExpertParams::Zeros(f.shape()));
  }
  std::optional<ReplicaClient::Deadline> deadline;
  for (int chunk = 0; chunk < chunks; ++chunk) {
    // A chunk whose every backward ran on its copy: the copy's share, over
    // as many micro-batches.
    bool rows = false, remote = true;
    int micro_batches = 0;
    for (const auto& [micro_batch, c] : shard->contributions) {
      if (c.dy.empty() || ChunkRows(c.dy.dim(0), chunks, chunk).size() == 0) {
        continue;
      }
      rows = true;
      ++micro_batches;
      remote = remote && chunk < static_cast<int>(c.remote.size()) &&
               c.remote[chunk];
    }
    if (!rows) continue;
    if (remote && replicas_ != nullptr) {
      if (!deadline) deadline = replicas_->NewDeadline();
      StatusOr<Tensor> flat =
          replicas_->Share(shard->id, shard->chunk_epoch, shard->chunk_step,
                           chunk, micro_batches, *deadline);
      if (flat.ok() && !flat->empty() &&
          UnflattenParams(*flat, first ? &shard->grads : &share).ok()) {
        if (!first) add(share);
        first = false;
        continue;
      }
    }
    // Here: the pieces that ran on a copy computed again first.
    for (auto& [micro_batch, c] : shard->contributions) {
      if (c.dy.empty() || chunk >= static_cast<int>(c.remote.size()) ||
          !c.remote[chunk]) {
        continue;
      }
      RETURN_IF_ERROR(
          RecomputeChunk(*shard, ChunkRows(c.dy.dim(0), chunks, chunk), &c));
      c.remote[chunk] = 0;
    }
    std::vector<Tensor> views;  // Keeps the slices alive.
    views.reserve(4 * shard->contributions.size());
    std::vector<const Tensor*> xs, as, dhs, dys;
    for (const auto& [micro_batch, c] : shard->contributions) {
      if (c.dy.empty()) continue;  // No rows.
      const RowRange r = ChunkRows(c.dy.dim(0), chunks, chunk);
      if (r.size() == 0) continue;
      for (const Tensor* t : {&c.x, &c.a, &c.dh, &c.dy}) {
        ASSIGN_OR_RETURN(Tensor view, t->Slice(r.begin, r.end));
        views.push_back(std::move(view));
      }
      const size_t n = views.size();
      xs.push_back(&views[n - 4]);
      as.push_back(&views[n - 3]);
      dhs.push_back(&views[n - 2]);
      dys.push_back(&views[n - 1]);
    }
    if (xs.empty()) continue;  // The chunk had no rows.
    ASSIGN_OR_RETURN(Tensor x, ConcatRows(*pool_, xs, d));
    ASSIGN_OR_RETURN(Tensor a, ConcatRows(*pool_, as, ff));
    ASSIGN_OR_RETURN(Tensor dh, ConcatRows(*pool_, dhs, gf));
    ASSIGN_OR_RETURN(Tensor dy, ConcatRows(*pool_, dys, d));
    if (first) {
      RETURN_IF_ERROR(f.ComputeGrads(x, a, dh, dy, &shard->grads));
      first = false;
      continue;
    }
    RETURN_IF_ERROR(f.ComputeGrads(x, a, dh, dy, &share));
    add(share);
  }
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

Status ShardCompute::RecomputeChunk(const ExpertShard& shard, RowRange r,
                                    ExpertShard::Contribution* c) const {
  const ExpertFfn& f = ffn(shard.id.shard);
  const int64_t d = f.shape().d_model;
  const int64_t gf = f.shape().gates() * f.shape().d_ff_shard;
  ASSIGN_OR_RETURN(Tensor x, c->x.Slice(r.begin, r.end));
  ASSIGN_OR_RETURN(Tensor dy, c->dy.Slice(r.begin, r.end));
  ASSIGN_OR_RETURN(Tensor a, c->a.Slice(r.begin, r.end));
  ASSIGN_OR_RETURN(Tensor dh, c->dh.Slice(r.begin, r.end));
  ASSIGN_OR_RETURN(Tensor h, pool_->Take(DType::kF32, {r.size(), gf}));
  ASSIGN_OR_RETURN(Tensor y, pool_->Take(DType::kF32, {r.size(), d}));
  ASSIGN_OR_RETURN(Tensor dx, pool_->Take(DType::kF32, {r.size(), d}));
  const int64_t ff = f.shape().d_ff_shard;
  const float* keep = c->keep.empty() ? nullptr : c->keep.data() + r.begin * ff;
  RETURN_IF_ERROR(f.Forward(shard.params, x, keep, &h, &y));
  return f.BackwardInput(shard.params, h, dy, keep, &dh, &a, &dx);
}

void ShardCompute::PushAhead(int64_t step, const ExpertShard& shard) const {
  if (replicas_ == nullptr || shard.chunk_step != step - 1) return;
  const StatusOr<int> chunks = Chunks(shard);
  if (!chunks.ok() || *chunks <= 1) return;
  replicas_->PushAhead(shard.id, shard.params, shard.chunk_epoch, step);
}

int ShardCompute::AdvancePlan(int64_t step, ExpertShard* shard) const {
  if (shard->repl.empty()) return 1;
  const std::string name = shard->id.ToString();
  auto read = ReadReplication(shard->repl, name);
  if (!read.ok()) return 1;  // Gradients refused the step already.
  ReplicationState plan = *read;
  constexpr int64_t kMaxTokens = (int64_t{1} << 48) - 1;
  plan.window_tokens =
      std::min(kMaxTokens, plan.window_tokens + shard->step_tokens);
  shard->step_tokens = 0;
  const auto& r = config_.replication();
  if ((step + 1) % r.window_steps() == 0) {
    const double mean = MeanExpertTokensPerStep(config_) * r.window_steps();
    const int next = PlanReplicas(r, plan.replicas, plan.window_tokens, mean);
    if (next != plan.replicas) {
      LOG(INFO) << name << ": " << next
                << (next == 1 ? " replica" : " replicas") << " from step "
                << step + 1 << " (load " << std::fixed << std::setprecision(2)
                << plan.window_tokens / mean
                << " x the mean expert's over steps "
                << step + 1 - r.window_steps() << "-" << step << ")";
    }
    plan = {next, 0};
  }
  WriteReplication(plan, &shard->repl);
  if (shard->replicas_gauge == nullptr) {
    shard->replicas_gauge = MetricsRegistry::Global().GetGauge(
        "switchyard_worker_expert_replicas{shard=\"" + name + "\"}");
  }
  shard->replicas_gauge->Set(plan.replicas);
  return plan.replicas;
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
