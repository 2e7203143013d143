// A worker's copies of other workers' hot expert shards
// (docs/replication.md). The primary of a replicated shard sends, for a
// step, over the data plane:
//   replica-weights: the shard's parameters for that step, in the form
//     its products use (WeightsForCopies: fp32, or in a bf16 run bf16
//     weights and fp32 biases), which replace the copy's and drop what it
//     kept;
//   replica-forward (micro-batch; trainer_rank: the chunk): x (T, d) -> y,
//     the activations kept (with model.expert_dropout, each row carries
//     its keep multipliers after x: (T, d + f));
//   replica-backward: dy (T, d) -> dx, the weight-gradient inputs kept;
//   replica-share: no payload -> the chunk's share of the weight gradient,
//     one GEMM over its rows of every micro-batch in micro-batch order
//     ((1, n) as the weights; no payload when it had none);
//   replica-drop: frees the copy (the shard cooled, or its chunks went to
//     other hosts) unless it holds newer weights, and refuses weights of
//     that step or older that come after it.
// The copy computes with the primary's code (ExpertFfn) on the primary's
// weights, so a chunk has the same bits wherever it runs.
//
// Copies live within replication.reserved_bytes, their activations
// included; a new one evicts the least recently used (the primary computes
// an evicted copy's chunks itself), and a chunk whose activations do not
// fit is refused (the primary computes it itself). Requests are served on a
// thread of their own, never on the compute thread or under the worker's state
// lock: a primary waiting for its copies never waits on another primary's
// compute thread, so two primaries replicating onto each other cannot deadlock.
//
// Thread-safety: Handle() is thread-safe and never blocks.
#ifndef SWITCHYARD_EXPERT_WORKER_REPLICA_HOST_H_
#define SWITCHYARD_EXPERT_WORKER_REPLICA_HOST_H_

#include <atomic>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "common/buffer_pool.h"
#include "common/ids.h"
#include "common/status.h"
#include "common/work_queue.h"
#include "config.pb.h"
#include "expert_worker/expert_ffn.h"
#include "expert_worker/gemm.h"
#include "expert_worker/worker_task.h"
#include "transport/data_plane.h"

namespace switchyard::expert_worker {

class ReplicaHost {
 public:
  // `gemm` is not owned and outlives this (its products run on this
  // host's thread and the worker's compute thread at once: the CPU GEMM
  // holds no state between calls).
  ReplicaHost(const config::SwitchyardConfig& config, std::string name,
              const ExpertShape& shape0, const ExpertShape& shape, Gemm* gemm);
  ~ReplicaHost();
  ReplicaHost(const ReplicaHost&) = delete;
  ReplicaHost& operator=(const ReplicaHost&) = delete;

  void Start();
  // Answers what is queued, then stops. Idempotent.
  void Shutdown();
  // Queues one replica request.
  void Handle(Task task);

  // Bytes the copies hold now (weights, share buffers, activations).
  int64_t bytes() const { return bytes_.load(std::memory_order_relaxed); }
  // Rows of chunks whose forward ran here since the last call (the
  // worker's heartbeats report them: work it does for other workers).
  uint64_t TakeRowsServed() { return rows_served_.exchange(0); }

 private:
  struct Copy {
    ExpertParams params;
    uint64_t epoch = 0;
    int64_t step = -1;
    int64_t bytes = 0;
    // A forward's rows, hidden activations and (expert dropout) keep
    // multipliers.
    struct Kept {
      Tensor x, h, keep;
    };
    std::map<int32_t, Kept> activations;  // By micro-batch.
    struct Inputs {
      Tensor x, a, dh, dy;
    };
    std::map<int32_t, Inputs> contributions;  // By micro-batch.
    ExpertParams share;  // The share's buffers, kept between steps.
    // Bytes of `activations` and `contributions` (counted in bytes_ too).
    int64_t held = 0;
  };

  void Loop();
  StatusOr<Tensor> Serve(const transport::Message& request);
  StatusOr<Tensor> Weights(const transport::Message& request,
                           const ShardId& id);
  StatusOr<Copy*> Current(const transport::WireHeader& h, const ShardId& id);
  void Drop(const ShardId& id);
  // Refuses (RESOURCE_EXHAUSTED) `more` bytes of activations beyond
  // replication.reserved_bytes.
  Status Room(const ShardId& id, int64_t more) const;
  // Counts `copy`'s activations and contributions again, after a change.
  void Recount(Copy* copy);
  const ExpertFfn& ffn(int shard) const { return shard == 0 ? ffn0_ : ffn_; }

  const config::SwitchyardConfig& config_;
  const std::string name_;
  const ExpertFfn ffn0_, ffn_;
  // Every buffer a chunk needs (fresh memory costs a page fault per 4 KiB).
  const std::shared_ptr<BufferPool> pool_;
  WorkQueue<Task> queue_;
  std::thread thread_;
  // Only the host's thread touches the copies.
  std::map<ShardId, Copy> copies_;
  std::list<ShardId> recent_;  // Least recently used first.
  // The newest (epoch, step) each shard's primary dropped its copy at.
  std::map<ShardId, std::pair<uint64_t, int64_t>> dropped_;
  std::atomic<int64_t> bytes_{0};
  std::atomic<uint64_t> rows_served_{0};
};

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_REPLICA_HOST_H_
