#include "trainer/dense_client.h"

#include <cstring>

#include "common/model_shape.h"

namespace switchyard::trainer {

using transport::Message;
using transport::MessageKind;

DenseTableClient::DenseTableClient(transport::DataPlane* data_plane,
                                   const config::SwitchyardConfig& config,
                                   int rank)
    : data_plane_(data_plane),
      config_(config),
      rank_(rank),
      timeout_(config.transport().request_timeout_ms()) {}

void DenseTableClient::SetRouting(const control::RoutingTable& routing) {
  routing_ = routing;
  address_.clear();
  where_.clear();
  for (const auto& e : routing.entries()) {
    if (e.shard().kind() == control::DENSE && e.worker() >= 0) {
      const auto& w = routing.workers(e.worker());
      address_[e.shard().shard()] = w.data_address();
      where_[e.shard().shard()] = w.name() + " at " + w.data_address();
    }
  }
}

StatusOr<std::vector<Tensor>> DenseTableClient::Exchange(
    MessageKind kind, int64_t step, std::vector<Tensor> payloads) {
  std::vector<transport::Outgoing> requests;
  for (int s = 0; s < config_.model().dense_shards(); ++s) {
    auto it = address_.find(s);
    if (it == address_.end()) {
      return FailedPreconditionError("dense shard D" + std::to_string(s) +
                                     " has no worker at epoch " +
                                     std::to_string(routing_.epoch()));
    }
    transport::WireHeader header;
    header.kind = static_cast<uint8_t>(kind);
    header.step = step;
    header.expert = -1;
    header.shard = s;
    header.trainer_rank = rank_;
    header.epoch = routing_.epoch();
    Tensor payload = payloads.empty() ? Tensor() : std::move(payloads[s]);
    requests.push_back({it->second,
                        transport::TensorMessage(header, std::move(payload)),
                        "D" + std::to_string(s) + " on " + where_[s]});
  }
  return transport::SendAll(data_plane_, std::move(requests), timeout_);
}

StatusOr<Tensor> DenseTableClient::Pull(int64_t step) {
  ASSIGN_OR_RETURN(std::vector<Tensor> parts,
                   Exchange(MessageKind::kDensePull, step, {}));
  const int64_t total = DenseParams(config_.model());
  // Every value is overwritten: the shards' ranges tile [0, total).
  ASSIGN_OR_RETURN(Tensor flat, pool_->Take(DType::kF32, {1, total}));
  int64_t covered = 0;
  for (int s = 0; s < config_.model().dense_shards(); ++s) {
    const DenseRange range = DenseShardRange(config_.model(), s, total);
    if (parts[s].num_elements() != range.count ||
        parts[s].dtype() != DType::kF32) {
      return DataLossError("dense shard D" + std::to_string(s) + " returned " +
                           parts[s].DebugString() + ", expected " +
                           std::to_string(range.count) + " fp32 values");
    }
    if (range.begin != covered) {
      return InternalError("dense shard D" + std::to_string(s) + " starts at " +
                           std::to_string(range.begin) + ", not " +
                           std::to_string(covered));
    }
    std::memcpy(flat.f32() + range.begin, parts[s].data(),
                parts[s].num_bytes());
    covered += range.count;
  }
  if (covered != total) {
    return InternalError("dense shards cover " + std::to_string(covered) +
                         " of " + std::to_string(total) + " values");
  }
  return flat;
}

Status DenseTableClient::Push(int64_t step, const Tensor& grads) {
  const int64_t total = DenseParams(config_.model());
  if (grads.dtype() != DType::kF32 || grads.num_elements() != total) {
    return InvalidArgumentError("dense gradient " + grads.DebugString() +
                                " must hold " + std::to_string(total) +
                                " fp32 values");
  }
  std::vector<Tensor> payloads;
  for (int s = 0; s < config_.model().dense_shards(); ++s) {
    const DenseRange range = DenseShardRange(config_.model(), s, total);
    ASSIGN_OR_RETURN(Tensor part, pool_->Take(DType::kF32, {1, range.count}));
    std::memcpy(part.data(), grads.f32() + range.begin,
                range.count * sizeof(float));
    payloads.push_back(std::move(part));
  }
  return Exchange(MessageKind::kDensePush, step, std::move(payloads)).status();
}

}  // namespace switchyard::trainer
