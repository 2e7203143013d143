#include "expert_worker/replica_host.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/metrics.h"
#include "common/model_shape.h"
#include "common/thread_name.h"
#include "expert_worker/cpu/activation_kernels.h"
#include "expert_worker/replication.h"

namespace switchyard::expert_worker {

using transport::Message;
using transport::MessageKind;

namespace {

Counter* Chunks() {
  static Counter* c = MetricsRegistry::Global().GetCounter(
      "switchyard_worker_replica_chunks_served_total");
  return c;
}

}  // namespace

ReplicaHost::ReplicaHost(const config::SwitchyardConfig& config,
                         std::string name, const ExpertShape& shape0,
                         const ExpertShape& shape, Gemm* gemm)
    : config_(config),
      name_(std::move(name)),
      ffn0_(shape0, gemm),
      ffn_(shape, gemm),
      pool_(BufferPool::Create(size_t{256} << 20)) {}

ReplicaHost::~ReplicaHost() { Shutdown(); }

void ReplicaHost::Start() {
  thread_ = StartNamedThread("sy-replicas", [this] { Loop(); });
}

void ReplicaHost::Shutdown() {
  queue_.Close();
  if (thread_.joinable()) thread_.join();
  AnswerShuttingDown(queue_.Drain(), name_);
}

void ReplicaHost::Handle(Task task) {
  std::optional<Task> refused = queue_.Push(std::move(task));
  if (refused) AnswerShuttingDown({std::move(*refused)}, name_);
}

void ReplicaHost::Loop() {
  SetKernelThreads(config_.training().threads());
  while (std::optional<Task> task = queue_.Pop()) {
    const transport::WireHeader& h = task->request.header;
    StatusOr<Tensor> out = Serve(task->request);
    task->reply(out.ok() ? transport::TensorResponse(h, std::move(*out))
                         : transport::ErrorResponse(
                               h, out.status().WithContext(
                                      name_ + " serving " +
                                      transport::DescribeHeader(h))));
  }
}

StatusOr<Tensor> ReplicaHost::Serve(const Message& request) {
  const transport::WireHeader& h = request.header;
  const auto& m = config_.model();
  if (h.layer < 0 || h.layer >= NumMoeLayers(m) || h.expert < 0 ||
      h.expert >= m.num_experts() || h.shard < 0 ||
      h.shard >= m.shards_per_expert()) {
    return NotFoundError("no expert shard L" + std::to_string(h.layer) + ".E" +
                         std::to_string(h.expert) + ".S" +
                         std::to_string(h.shard) + " in this model");
  }
  const ShardId id = ShardId::Expert(h.layer, h.expert, h.shard);
  const auto kind = static_cast<MessageKind>(h.kind);
  // Weights come in the form of the copy's products (Weights checks it);
  // rows are fp32.
  if (kind == MessageKind::kReplicaWeights) return Weights(request, id);
  if (!request.payload.empty() && request.payload.dtype() != DType::kF32) {
    return InvalidArgumentError(
        "replica rows are fp32, not " +
        std::string(DTypeName(request.payload.dtype())));
  }
  if (kind == MessageKind::kReplicaDrop) {
    // Weights of the step named, or older, that come after it (sent ahead
    // before the primary placed the step elsewhere) are refused; a copy
    // with newer weights stays.
    const std::pair<uint64_t, int64_t> at{h.epoch, h.step};
    auto& dropped = dropped_[id];
    dropped = std::max(dropped, at);
    auto found = copies_.find(id);
    if (found != copies_.end() &&
        std::make_pair(found->second.epoch, found->second.step) <= at) {
      Drop(id);
    }
    return Tensor();
  }
  ASSIGN_OR_RETURN(Copy * copy, Current(h, id));
  const ExpertFfn& f = ffn(h.shard);
  const int64_t d = f.shape().d_model, ff = f.shape().d_ff_shard;
  const int64_t gf = f.shape().gates() * ff;
  if (kind == MessageKind::kReplicaShare) {
    if (static_cast<int64_t>(copy->contributions.size()) != h.micro_batch) {
      return FailedPreconditionError(
          "the copy holds the backwards of " +
          std::to_string(copy->contributions.size()) +
          " micro-batches; the primary's share needs " +
          std::to_string(h.micro_batch));
    }
    std::vector<const Tensor*> xs, as, dhs, dys;
    for (const auto& [mb, c] : copy->contributions) {
      xs.push_back(&c.x);
      as.push_back(&c.a);
      dhs.push_back(&c.dh);
      dys.push_back(&c.dy);
    }
    if (xs.empty()) return Tensor();
    ASSIGN_OR_RETURN(Tensor x, ConcatRows(*pool_, xs, d));
    ASSIGN_OR_RETURN(Tensor a, ConcatRows(*pool_, as, ff));
    ASSIGN_OR_RETURN(Tensor dh, ConcatRows(*pool_, dhs, gf));
    ASSIGN_OR_RETURN(Tensor dy, ConcatRows(*pool_, dys, d));
    ExpertParams& share = copy->share;
    RETURN_IF_ERROR(f.ComputeGrads(x, a, dh, dy, &share));
    copy->contributions.clear();
    Recount(copy);
    return FlattenParams(share, pool_.get());
  }
  if (h.micro_batch < 0 ||
      h.micro_batch >= config_.training().micro_batches()) {
    return InvalidArgumentError(
        "micro-batch " + std::to_string(h.micro_batch) +
        " is outside [0, training.micro_batches " +
        std::to_string(config_.training().micro_batches()) + ")");
  }
  // With expert dropout a forward's rows carry their keep multipliers
  // after x: (T, d + f).
  const bool dropout = config_.model().expert_dropout() > 0;
  const Tensor& in = request.payload;
  const int64_t width =
      kind == MessageKind::kReplicaForward && dropout ? d + ff : d;
  if (in.empty() || in.shape().size() != 2 || in.dim(1) != width ||
      in.dim(0) == 0) {
    return InvalidArgumentError("a replica chunk is (T > 0, " +
                                std::to_string(width) + "), not " +
                                (in.empty() ? "<none>" : in.DebugString()));
  }
  const int64_t rows = in.dim(0);
  if (kind == MessageKind::kReplicaForward) {
    if (copy->activations.count(h.micro_batch) ||
        copy->contributions.count(h.micro_batch)) {
      return AlreadyExistsError("this chunk's forward came before");
    }
    RETURN_IF_ERROR(Room(id, in.num_bytes() + rows * gf * 4));
    Copy::Kept kept{in, Tensor(), Tensor()};
    if (dropout) {
      ASSIGN_OR_RETURN(kept.x, pool_->Take(DType::kF32, {rows, d}));
      ASSIGN_OR_RETURN(kept.keep, pool_->Take(DType::kF32, {rows, ff}));
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = in.f32() + r * width;
        std::memcpy(kept.x.f32() + r * d, row, d * sizeof(float));
        std::memcpy(kept.keep.f32() + r * ff, row + d, ff * sizeof(float));
      }
    }
    ASSIGN_OR_RETURN(kept.h, pool_->Take(DType::kF32, {rows, gf}));
    ASSIGN_OR_RETURN(Tensor y, pool_->Take(DType::kF32, {rows, d}));
    RETURN_IF_ERROR(f.Forward(copy->params, kept.x,
                              dropout ? kept.keep.f32() : nullptr, &kept.h,
                              &y));
    copy->activations[h.micro_batch] = std::move(kept);
    Recount(copy);
    Chunks()->Increment();
    rows_served_.fetch_add(rows, std::memory_order_relaxed);
    return y;
  }
  if (kind != MessageKind::kReplicaBackward) {
    return InvalidArgumentError("not a replica request");
  }
  auto it = copy->activations.find(h.micro_batch);
  if (it == copy->activations.end()) {
    return FailedPreconditionError("a backward without its forward");
  }
  const Copy::Kept& kept = it->second;
  const Tensor& x = kept.x;
  if (x.dim(0) != rows) {
    return InvalidArgumentError("the backward has " + std::to_string(rows) +
                                " rows, its forward " +
                                std::to_string(x.dim(0)));
  }
  // dy and the weight-gradient inputs come; the hidden activations go.
  RETURN_IF_ERROR(Room(id, in.num_bytes() + rows * ff * 4));
  Copy::Inputs c{x, Tensor(), Tensor(), in};
  ASSIGN_OR_RETURN(c.dh, pool_->Take(DType::kF32, {rows, gf}));
  ASSIGN_OR_RETURN(c.a, pool_->Take(DType::kF32, {rows, ff}));
  ASSIGN_OR_RETURN(Tensor dx, pool_->Take(DType::kF32, {rows, d}));
  RETURN_IF_ERROR(f.BackwardInput(copy->params, kept.h, in,
                                  kept.keep.empty() ? nullptr : kept.keep.f32(),
                                  &c.dh, &c.a, &dx));
  copy->contributions[h.micro_batch] = std::move(c);
  copy->activations.erase(it);
  Recount(copy);
  Chunks()->Increment();
  return dx;
}

StatusOr<Tensor> ReplicaHost::Weights(const Message& request,
                                      const ShardId& id) {
  const transport::WireHeader& h = request.header;
  auto dropped = dropped_.find(id);
  if (dropped != dropped_.end() &&
      std::make_pair(h.epoch, h.step) <= dropped->second) {
    return FailedPreconditionError("the primary dropped this copy at step " +
                                   std::to_string(dropped->second.second) +
                                   " (epoch " +
                                   std::to_string(dropped->second.first) + ")");
  }
  const ExpertFfn& f = ffn(id.shard);
  // The form first: a malformed push changes nothing.
  RETURN_IF_ERROR(CheckCopyWeights(request.payload, f.shape()));
  auto found = copies_.find(id);
  if (found != copies_.end() && found->second.epoch == h.epoch &&
      found->second.step == h.step) {
    // Pushed again in the step (the primary's own bookkeeping was reset):
    // the same values, and the micro-batches kept stay.
    recent_.remove(id);
    recent_.push_back(id);
    return Tensor();
  }
  if (found == copies_.end()) {
    ASSIGN_OR_RETURN(ExpertParams params,
                     ExpertParams::Zeros(f.shape(), f.shape().compute_dtype));
    // Its weights and a gradient share's buffers.
    ASSIGN_OR_RETURN(ExpertParams share, ExpertParams::Zeros(f.shape()));
    int64_t bytes = 0;
    for (const Tensor* t :
         {&params.w1, &params.b1, &params.w2, &params.b2, &params.w1_bf16,
          &params.w2_bf16, &share.w1, &share.b1, &share.w2, &share.b2}) {
      bytes += t->empty() ? 0 : static_cast<int64_t>(t->num_bytes());
    }
    // Room within the reservation: the least recently used copies go.
    const int64_t reserved = config_.replication().reserved_bytes();
    while (!recent_.empty() && bytes_.load() + bytes > reserved) {
      const ShardId victim = recent_.front();
      Drop(victim);
    }
    if (bytes_.load() + bytes > reserved) {
      return ResourceExhaustedError(
          "a copy of " + id.ToString() + " needs " + std::to_string(bytes) +
          " bytes; replication.reserved_bytes is " + std::to_string(reserved));
    }
    found = copies_.emplace(id, Copy()).first;
    found->second.params = std::move(params);
    found->second.share = std::move(share);
    found->second.bytes = bytes;
    bytes_ += bytes;
  }
  Copy& copy = found->second;
  recent_.remove(id);
  recent_.push_back(id);
  // Invalid until the new weights are in.
  copy.step = -1;
  copy.activations.clear();
  copy.contributions.clear();
  Recount(&copy);
  RETURN_IF_ERROR(TakeWeights(request.payload, f.shape(), &copy.params));
  copy.epoch = h.epoch;
  copy.step = h.step;
  return Tensor();
}

Status ReplicaHost::Room(const ShardId& id, int64_t more) const {
  const int64_t reserved = config_.replication().reserved_bytes();
  if (bytes_.load() + more <= reserved) return OkStatus();
  return ResourceExhaustedError(
      "a chunk of " + id.ToString() + " needs " + std::to_string(more) +
      " more bytes; the copies hold " + std::to_string(bytes_.load()) +
      " of replication.reserved_bytes " + std::to_string(reserved));
}

void ReplicaHost::Recount(Copy* copy) {
  int64_t held = 0;
  for (const auto& [mb, k] : copy->activations) {
    for (const Tensor* t : {&k.x, &k.h, &k.keep}) {
      held += static_cast<int64_t>(t->num_bytes());
    }
  }
  for (const auto& [mb, c] : copy->contributions) {
    for (const Tensor* t : {&c.x, &c.a, &c.dh, &c.dy}) {
      held += static_cast<int64_t>(t->num_bytes());
    }
  }
  bytes_ += held - copy->held;
  copy->held = held;
}

void ReplicaHost::Drop(const ShardId& id) {
  auto found = copies_.find(id);
  if (found == copies_.end()) return;
  bytes_ -= found->second.bytes + found->second.held;
  copies_.erase(found);
  recent_.remove(id);
}

StatusOr<ReplicaHost::Copy*> ReplicaHost::Current(
    const transport::WireHeader& h, const ShardId& id) {
  auto found = copies_.find(id);
  if (found == copies_.end()) {
    return FailedPreconditionError("no copy of " + id.ToString() + " here");
  }
  Copy& copy = found->second;
  if (copy.epoch != h.epoch || copy.step != h.step) {
    return FailedPreconditionError("the copy of " + id.ToString() +
                                   " has the weights of step " +
                                   std::to_string(copy.step) + " (epoch " +
                                   std::to_string(copy.epoch) + ")");
  }
  recent_.remove(id);
  recent_.push_back(id);
  return &copy;
}

}  // namespace switchyard::expert_worker
