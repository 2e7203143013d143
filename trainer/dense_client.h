// The trainer's client for the dense parameter tables (parameter-server
// style; DESIGN.md "Processes").
//
// Pull(step) fetches every dense shard, concurrently, from the workers the
// routing table names and reassembles the flat DenseLayout vector: the
// parameters after `step` updates. Push(step, grads) sends each shard its
// slice of the flat gradient. Every request has a deadline; an unplaced
// shard or an unreachable worker is an error naming it.
//
// Thread-compatible: one trainer thread drives a client.
#ifndef SWITCHYARD_TRAINER_DENSE_CLIENT_H_
#define SWITCHYARD_TRAINER_DENSE_CLIENT_H_

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/buffer_pool.h"
#include "common/status.h"
#include "common/tensor.h"
#include "config.pb.h"
#include "control.pb.h"
#include "transport/data_plane.h"

namespace switchyard::trainer {

class DenseTableClient {
 public:
  DenseTableClient(transport::DataPlane* data_plane,
                   const config::SwitchyardConfig& config, int rank);

  void SetRouting(const control::RoutingTable& routing);

  // All dense parameters, (1, DenseParams) in DenseLayout order.
  StatusOr<Tensor> Pull(int64_t step);
  // grads: (1, DenseParams), the gradient of this rank for `step`.
  Status Push(int64_t step, const Tensor& grads);

 private:
  // Runs one request per dense shard concurrently; replies by shard index.
  StatusOr<std::vector<Tensor>> Exchange(transport::MessageKind kind,
                                         int64_t step,
                                         std::vector<Tensor> payloads);

  transport::DataPlane* data_plane_;  // Not owned.
  const config::SwitchyardConfig config_;
  const int rank_;
  const std::chrono::milliseconds timeout_;
  control::RoutingTable routing_;
  std::map<int, std::string> address_;  // Dense shard -> data address.
  std::map<int, std::string> where_;    // Dense shard -> "name at addr".
  // Every step's pulled parameters and pushed gradient parts: reused
  // buffers, not fresh memory (MoeLayerClient's pool_ says why).
  const std::shared_ptr<BufferPool> pool_ = BufferPool::Create(size_t{1} << 30);
};

}  // namespace switchyard::trainer

#endif  // SWITCHYARD_TRAINER_DENSE_CLIENT_H_
