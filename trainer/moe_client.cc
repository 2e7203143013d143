#include "trainer/moe_client.h"

#include <cstring>

#include "common/shard_ref.h"

namespace switchyard::trainer {

using transport::Message;
using transport::MessageKind;

namespace {

// The sum of expert batch b's shard replies (replies[b * shards + s]), in
// shard order: a fixed order, whatever order the replies arrived in (one
// shard: its reply itself).
StatusOr<Tensor> SumShards(BufferPool& pool, const std::vector<Tensor>& replies,
                           size_t b, int shards) {
  const Tensor& first = replies[b * shards];
  if (shards == 1) return first;
  ASSIGN_OR_RETURN(Tensor sum, pool.Take(DType::kF32, first.shape()));
  std::memcpy(sum.data(), first.data(), first.num_bytes());
  for (int s = 1; s < shards; ++s) {
    const Tensor& part = replies[b * shards + s];
    for (int64_t i = 0; i < sum.num_elements(); ++i) {
      sum.f32()[i] += part.f32()[i];
    }
  }
  return sum;
}

}  // namespace

MoeLayerClient::MoeLayerClient(transport::DataPlane* data_plane,
                               const config::SwitchyardConfig& config, int rank)
    : data_plane_(data_plane),
      config_(config),
      rank_(rank),
      timeout_(config.transport().request_timeout_ms()) {
  auto dtype = ParseDType(config.training().wire_dtype());
  if (dtype.ok()) wire_dtype_ = *dtype;
}

void MoeLayerClient::SetRouting(const control::RoutingTable& routing) {
  routing_ = routing;
  address_.clear();
  where_.clear();
  for (const auto& e : routing.entries()) {
    if (e.shard().kind() != control::EXPERT || e.worker() < 0) continue;
    const auto& w = routing.workers(e.worker());
    address_[FromShardRef(e.shard())] = w.data_address();
    // Errors name the worker, not only its address.
    where_[w.data_address()] = w.name() + " at " + w.data_address();
  }
}

StatusOr<std::string> MoeLayerClient::Address(const ShardId& id) const {
  auto it = address_.find(id);
  if (it == address_.end()) {
    return FailedPreconditionError("expert shard " + id.ToString() +
                                   " has no worker at epoch " +
                                   std::to_string(routing_.epoch()));
  }
  return it->second;
}

StatusOr<Tensor> MoeLayerClient::Buffer(std::vector<int64_t> shape, bool zero) {
  ASSIGN_OR_RETURN(Tensor t, pool_->Take(DType::kF32, std::move(shape)));
  if (zero) std::memset(t.data(), 0, t.num_bytes());
  return t;
}

StatusOr<std::vector<Tensor>> MoeLayerClient::Exchange(
    MessageKind kind, int64_t step, int micro_batch, int layer,
    const std::vector<int>& experts, std::vector<Tensor> payloads) {
  const int shards = config_.model().shards_per_expert();
  std::vector<transport::Outgoing> requests;
  for (size_t b = 0; b < experts.size(); ++b) {
    // One wire copy per expert batch, shared by its shards' requests (none
    // for a batch without rows).
    Tensor wire;
    if (!payloads[b * shards].empty()) {
      ASSIGN_OR_RETURN(wire,
                       pool_->Converted(payloads[b * shards], wire_dtype_));
    }
    for (int s = 0; s < shards; ++s) {
      const ShardId id = ShardId::Expert(layer, experts[b], s);
      ASSIGN_OR_RETURN(std::string address, Address(id));
      transport::WireHeader header;
      header.kind = static_cast<uint8_t>(kind);
      header.step = step;
      header.micro_batch = micro_batch;
      header.layer = layer;
      header.expert = experts[b];
      header.shard = s;
      header.trainer_rank = rank_;
      header.epoch = routing_.epoch();
      Message m = transport::TensorMessage(header, wire);
      requests.push_back(
          {address, std::move(m), id.ToString() + " on " + where_[address]});
    }
  }
  // bf16 answers become fp32 in pool buffers, not fresh memory.
  return transport::SendAll(data_plane_, std::move(requests), timeout_,
                            pool_.get());
}

StatusOr<Tensor> MoeLayerClient::Forward(int64_t step, int micro_batch,
                                         int layer, const Tensor& x,
                                         const RouterState<float>& route) {
  Saved saved;
  ASSIGN_OR_RETURN(Tensor y, Dispatch(MessageKind::kExpertForward, step,
                                      micro_batch, layer, x, route, &saved));
  saved_[{layer, micro_batch}] = std::move(saved);
  return y;
}

StatusOr<Tensor> MoeLayerClient::Evaluate(int64_t step, int layer,
                                          const Tensor& x,
                                          const RouterState<float>& route) {
  Saved unused;
  return Dispatch(MessageKind::kExpertEval, step, /*micro_batch=*/0, layer, x,
                  route, &unused);
}

StatusOr<Tensor> MoeLayerClient::Dispatch(MessageKind kind, int64_t step,
                                          int micro_batch, int layer,
                                          const Tensor& x,
                                          const RouterState<float>& route,
                                          Saved* out_saved) {
  const int T = route.tokens, k = route.k, E = route.experts;
  const int64_t d = config_.model().d_model();
  if (x.rank() != 2 || x.dim(0) != T || x.dim(1) != d) {
    return InvalidArgumentError("MoE input " + x.DebugString() +
                                " does not match the route");
  }
  Saved& saved = *out_saved;
  saved.tokens = T;
  saved.k = k;
  saved.gate = route.gate;
  saved.kept = route.kept;
  // Group kept assignments by expert, tokens in order.
  std::vector<std::vector<std::pair<int, int>>> rows(E);
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      if (route.kept[t * k + j])
        rows[route.expert[t * k + j]].push_back({t, j});
    }
  }
  std::vector<int> experts;
  std::vector<Tensor> payloads;
  const int shards = config_.model().shards_per_expert();
  // Training forwards (and their backwards) go to every expert, with no
  // payload where this rank has no rows for it: the workers compute each
  // shard once every rank's request is in. An evaluation asks only the
  // experts it routes tokens to.
  const bool everyone = kind == MessageKind::kExpertForward;
  for (int e = 0; e < E; ++e) {
    if (rows[e].empty()) {
      if (!everyone) continue;
      experts.push_back(e);
      for (int s = 0; s < shards; ++s) payloads.emplace_back();
      saved.batches.push_back({e, {}, Tensor()});
      continue;
    }
    ASSIGN_OR_RETURN(
        Tensor xe,
        Buffer({static_cast<int64_t>(rows[e].size()), d}, /*zero=*/false));
    for (size_t r = 0; r < rows[e].size(); ++r) {
      std::memcpy(xe.f32() + r * d, x.f32() + rows[e][r].first * d,
                  d * sizeof(float));
    }
    experts.push_back(e);
    for (int s = 0; s < shards; ++s) payloads.push_back(xe);
    saved.batches.push_back({e, std::move(rows[e]), Tensor()});
  }
  ASSIGN_OR_RETURN(
      std::vector<Tensor> replies,
      Exchange(kind, step, micro_batch, layer, experts, std::move(payloads)));
  ASSIGN_OR_RETURN(Tensor y, Buffer({T, d}, /*zero=*/true));
  // Fixed order: expert outputs sum their shards in shard order ...
  std::vector<int> batch_of_expert(E, -1);
  for (size_t b = 0; b < saved.batches.size(); ++b) {
    ExpertBatch& batch = saved.batches[b];
    if (batch.rows.empty()) continue;
    ASSIGN_OR_RETURN(batch.out, SumShards(*pool_, replies, b, shards));
    batch_of_expert[batch.expert] = static_cast<int>(b);
  }
  // ... and tokens combine their choices in (token, choice) order.
  std::vector<int> cursor(saved.batches.size(), 0);
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      if (!route.kept[t * k + j]) continue;
      const int b = batch_of_expert[route.expert[t * k + j]];
      const float* out = saved.batches[b].out.f32() + cursor[b]++ * d;
      const float g = route.gate[t * k + j];
      float* yt = y.f32() + t * d;
      for (int64_t i = 0; i < d; ++i) yt[i] += g * out[i];
    }
  }
  return y;
}

Status MoeLayerClient::Backward(int64_t step, int micro_batch, int layer,
                                const Tensor& dy, Tensor* dx,
                                std::vector<float>* d_gate) {
  auto it = saved_.find({layer, micro_batch});
  if (it == saved_.end()) {
    return FailedPreconditionError("MoE backward of layer " +
                                   std::to_string(layer) +
                                   " without its forward");
  }
  Saved saved = std::move(it->second);
  saved_.erase(it);
  const int T = saved.tokens, k = saved.k;
  const int64_t d = config_.model().d_model();
  if (dy.rank() != 2 || dy.dim(0) != T || dy.dim(1) != d) {
    return InvalidArgumentError("MoE output gradient " + dy.DebugString() +
                                " does not match the forward");
  }
  d_gate->assign(static_cast<size_t>(T) * k, 0.0f);
  std::vector<int> experts;
  std::vector<Tensor> payloads;
  const int shards = config_.model().shards_per_expert();
  for (const ExpertBatch& batch : saved.batches) {
    experts.push_back(batch.expert);
    if (batch.rows.empty()) {  // Every shard hears of every micro-batch.
      for (int s = 0; s < shards; ++s) payloads.emplace_back();
      continue;
    }
    ASSIGN_OR_RETURN(
        Tensor dye,
        Buffer({static_cast<int64_t>(batch.rows.size()), d}, /*zero=*/false));
    for (size_t r = 0; r < batch.rows.size(); ++r) {
      const auto [t, j] = batch.rows[r];
      const float g = saved.gate[t * k + j];
      const float* dyt = dy.f32() + t * d;
      const float* out = batch.out.f32() + r * d;
      float dot = 0;
      for (int64_t i = 0; i < d; ++i) {
        dye.f32()[r * d + i] = g * dyt[i];
        dot += dyt[i] * out[i];
      }
      (*d_gate)[t * k + j] = dot;
    }
    for (int s = 0; s < shards; ++s) payloads.push_back(dye);
  }
  ASSIGN_OR_RETURN(std::vector<Tensor> replies,
                   Exchange(MessageKind::kExpertBackward, step, micro_batch,
                            layer, experts, std::move(payloads)));
  ASSIGN_OR_RETURN(*dx, Buffer({T, d}, /*zero=*/true));
  // Same fixed order as the forward.
  for (size_t b = 0; b < saved.batches.size(); ++b) {
    const ExpertBatch& batch = saved.batches[b];
    if (batch.rows.empty()) continue;
    ASSIGN_OR_RETURN(const Tensor sum, SumShards(*pool_, replies, b, shards));
    for (size_t r = 0; r < batch.rows.size(); ++r) {
      float* dxt = dx->f32() + batch.rows[r].first * d;
      const float* src = sum.f32() + r * d;
      for (int64_t i = 0; i < d; ++i) dxt[i] += src[i];
    }
  }
  return OkStatus();
}

Status MoeLayerClient::StepDone(int64_t step) {
  // To every worker holding a shard: a spare (a worker just joined, one
  // drained and about to leave) has no update to apply.
  std::vector<bool> holds(routing_.workers_size(), false);
  for (const auto& e : routing_.entries()) {
    if (e.worker() >= 0 && e.worker() < routing_.workers_size()) {
      holds[e.worker()] = true;
    }
  }
  std::vector<transport::Outgoing> requests;
  for (int w = 0; w < routing_.workers_size(); ++w) {
    if (!holds[w]) continue;
    const auto& worker = routing_.workers(w);
    Message m;
    m.header.kind = static_cast<uint8_t>(MessageKind::kStepDone);
    m.header.step = step;
    m.header.expert = -1;
    m.header.trainer_rank = rank_;
    m.header.epoch = routing_.epoch();
    requests.push_back(
        {worker.data_address(), std::move(m), "step done to " + worker.name()});
  }
  return transport::SendAll(data_plane_, std::move(requests), timeout_)
      .status();
}

}  // namespace switchyard::trainer
