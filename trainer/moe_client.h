// Dispatch and combine for one MoE layer of one trainer.
//
// Forward: the routed tokens of each expert go, as one request per expert
// shard and all concurrently, to the workers the routing table names; the
// shard outputs of an expert are summed (shard order) and each token's output
// is sum_j gate_tj * expert_out(x_t), summed in (token, choice) order, so the
// result never depends on the order replies arrive in. Every expert shard
// gets a forward (and a backward), with no payload when it has no tokens
// here: the worker computes each shard once every trainer's request has
// come, over all of their rows in rank order, and answers each its own
// (expert_worker/worker_service.h); every trainer of the cluster must
// therefore run the same layers and micro-batches. An evaluation asks only
// the experts it routes tokens to. Backward sends each shard its tokens'
// gate-weighted output gradients and returns dx (the same fixed-order sums) and
// d_gate_tj = dy_t . expert_out_tj for the router.
//
// Every request carries (step, micro-batch, layer, expert, shard, rank,
// epoch) and has a deadline; an unplaced shard or an unreachable worker is an
// error naming it, never a hang.
//
// Thread-compatible: one trainer thread drives a client. The client keeps
// what Backward needs from Forward, per (layer, micro-batch).
#ifndef SWITCHYARD_TRAINER_MOE_CLIENT_H_
#define SWITCHYARD_TRAINER_MOE_CLIENT_H_

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/buffer_pool.h"
#include "common/ids.h"
#include "common/status.h"
#include "common/tensor.h"
#include "config.pb.h"
#include "control.pb.h"
#include "trainer/router.h"
#include "transport/data_plane.h"

namespace switchyard::trainer {

class MoeLayerClient {
 public:
  MoeLayerClient(transport::DataPlane* data_plane,
                 const config::SwitchyardConfig& config, int rank);

  // Adopts a routing table (its epoch tags every request).
  void SetRouting(const control::RoutingTable& routing);

  // x: (T, d_model) fp32; `route` from RouteForward on x. Returns
  // y: (T, d_model).
  StatusOr<Tensor> Forward(int64_t step, int micro_batch, int layer,
                           const Tensor& x, const RouterState<float>& route);

  // The same output without training state: the workers keep nothing (for
  // validation and sampling with the parameters after `step` updates).
  StatusOr<Tensor> Evaluate(int64_t step, int layer, const Tensor& x,
                            const RouterState<float>& route);

  // dy: (T, d_model). Writes dx: (T, d_model) and d_gate: (T, k).
  Status Backward(int64_t step, int micro_batch, int layer, const Tensor& dy,
                  Tensor* dx, std::vector<float>* d_gate);

  // StepDone(step, rank) to every worker of the routing table holding a
  // shard.
  Status StepDone(int64_t step);

 private:
  struct ExpertBatch {
    int expert = 0;
    std::vector<std::pair<int, int>> rows;  // (token, choice), token order
    Tensor out;                             // (rows, d): sum over shards
  };
  struct Saved {
    int tokens = 0, k = 0;
    std::vector<float> gate;    // (T, k)
    std::vector<uint8_t> kept;  // (T, k)
    std::vector<ExpertBatch> batches;
  };

  // Sends the routed tokens of x as `kind` requests and combines the replies
  // into y; fills *saved with what Backward needs.
  StatusOr<Tensor> Dispatch(transport::MessageKind kind, int64_t step,
                            int micro_batch, int layer, const Tensor& x,
                            const RouterState<float>& route, Saved* saved);
  // Sends `kind` with one payload per (expert, shard) and returns the replies
  // indexed like `payloads` (expert-major, shard-minor).
  StatusOr<std::vector<Tensor>> Exchange(transport::MessageKind kind,
                                         int64_t step, int micro_batch,
                                         int layer,
                                         const std::vector<int>& experts,
                                         std::vector<Tensor> payloads);
  StatusOr<std::string> Address(const ShardId& id) const;

  // A pool tensor of `shape`, zero-filled when `zero`.
  StatusOr<Tensor> Buffer(std::vector<int64_t> shape, bool zero);

  transport::DataPlane* data_plane_;  // Not owned.
  // Every step's token batches, wire copies and outputs: reused, not fresh
  // memory (whose first touch costs 11.5 us per 4 KiB page on the CI VM),
  // and large ones on huge pages, which the shared-memory transport reads
  // faster (docs/performance.md).
  const std::shared_ptr<BufferPool> pool_ = BufferPool::Create(size_t{1} << 30);
  const config::SwitchyardConfig config_;
  const int rank_;
  const std::chrono::milliseconds timeout_;
  DType wire_dtype_ = DType::kF32;
  control::RoutingTable routing_;
  std::map<ShardId, std::string> address_;      // Placed shards only.
  std::map<std::string, std::string> where_;    // Address -> "name at addr".
  std::map<std::pair<int, int>, Saved> saved_;  // (layer, micro-batch)
};

}  // namespace switchyard::trainer

#endif  // SWITCHYARD_TRAINER_MOE_CLIENT_H_
