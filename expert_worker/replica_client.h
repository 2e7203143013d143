// A primary's side of hot-expert replication (docs/replication.md): where
// chunk c of a replicated shard runs, the weights each copy needs for the
// step, and the chunk requests, sent without waiting so that the primary
// computes its own chunk meanwhile.
//
// Where: the workers of the routing table other than this one, in the
// coordinator's order (SetCopyHosts: the workers less loaded than this one,
// least first), or without it the least shard bytes first. A shard's hosts
// are fixed at its first forward of a step and hold for the step; copies
// on hosts a step no longer uses are dropped. Where a chunk runs never
// changes its bits.
//
// Every failure (a copy host that is gone, refuses or is late) is an
// answer too: the caller computes that chunk itself, with the same bits,
// and the host is not asked again in this epoch.
//
// Thread-safety: thread-safe; the worker's compute thread calls it (under
// the worker's state lock: it waits only for its copies, whose hosts never
// wait for anything, ReplicaHost).
#ifndef SWITCHYARD_EXPERT_WORKER_REPLICA_CLIENT_H_
#define SWITCHYARD_EXPERT_WORKER_REPLICA_CLIENT_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "common/buffer_pool.h"
#include "common/ids.h"
#include "common/mutex.h"
#include "common/status.h"
#include "config.pb.h"
#include "control.pb.h"
#include "expert_worker/expert_ffn.h"
#include "transport/data_plane.h"

namespace switchyard::expert_worker {

class ReplicaClient {
 public:
  // `peers` is not owned and outlives this. `answered` (when given) runs
  // on the data plane's thread whenever a copy answers or fails a request,
  // possibly after this is destroyed: what it captures must outlive the
  // plane's requests.
  ReplicaClient(const config::SwitchyardConfig& config, std::string name,
                transport::DataPlane* peers,
                std::function<void()> answered = nullptr);

  // The workers of a routing table of a new epoch (confirmed ones other
  // than this one), and a fresh start for hosts that failed. A table of
  // the current or an older epoch changes nothing: chunks keep their hosts
  // for the whole epoch (a host's copy holds the step's micro-batches).
  void SetRouting(const control::RoutingTable& routing) EXCLUDES(mu_);
  // The coordinator's ranking of the workers for copies (HeartbeatAck.
  // copy_hosts: least loaded first); applies from each shard's next step.
  void SetCopyHosts(std::vector<std::string> names) EXCLUDES(mu_);

  // Everything a computation asks of its copies ends by one deadline:
  // NewDeadline() is a quarter of transport.request_timeout_ms from now,
  // so that the primary's own computation of what its copies did not
  // deliver still reaches the trainers within their deadline.
  using Deadline = std::chrono::steady_clock::time_point;
  Deadline NewDeadline() const {
    return std::chrono::steady_clock::now() + budget_;
  }

  // The start of `id`'s forward of micro-batch `micro_batch` at (epoch,
  // step) with `chunks` chunks: the first of the step fixes the hosts of
  // its chunks, and drops the copies on hosts it no longer uses (all of
  // them once the shard has cooled to one chunk).
  void BeginStep(const ShardId& id, uint64_t epoch, int64_t step, int chunks)
      EXCLUDES(mu_);

  // An answer on its way: Wait() for it.
  class Pending;

  // After `id`'s update: sends its weights for (epoch, step), the next
  // step, to the hosts of its last step's chunks without waiting, so that
  // the step's first forward finds them there (or waits only for what is
  // left of the transfer).
  void PushAhead(const ShardId& id, const ExpertParams& params, uint64_t epoch,
                 int64_t step) EXCLUDES(mu_);
  // Chunk `chunk` (>= 1) of `id`'s replicas: starts its forward (x ->
  // y) or backward (dy -> dx) on the chunk's host, after sending the host
  // the shard's weights for (epoch, step) when it does not have them yet.
  // Null when the chunk has no host (fewer workers than replicas, a host
  // that failed in this epoch, or a weights push that failed).
  std::shared_ptr<Pending> Start(transport::MessageKind kind, const ShardId& id,
                                 const ExpertParams& params, uint64_t epoch,
                                 int64_t step, int32_t micro_batch, int chunk,
                                 Tensor rows, Deadline deadline) EXCLUDES(mu_);
  // The share of the weight gradient of chunk `chunk` of `id` at (epoch,
  // step), over the `micro_batches` micro-batches whose backward of the
  // chunk ran on its host (which refuses if it holds another number); a
  // failure when it cannot be had.
  StatusOr<Tensor> Share(const ShardId& id, uint64_t epoch, int64_t step,
                         int chunk, int micro_batches, Deadline deadline)
      EXCLUDES(mu_);
  // The answer of `pending` (by its deadline); a failure marks its host
  // failed for the epoch.
  StatusOr<Tensor> Wait(Pending& pending) EXCLUDES(mu_);
  // Whether Wait(pending) would return at once: answered, or past its
  // deadline.
  static bool Answered(const Pending& pending);
  // When Wait(pending) gives up.
  static Deadline DeadlineOf(const Pending& pending);

  // "N chunks and M gradient shares computed by copies elsewhere, F
  // failures (their chunks computed here)", since the start.
  std::string Summary() const;
  // Rows of this worker's chunks whose forward ran on copies since the
  // last call (its heartbeats report them).
  uint64_t TakeRowsOffloaded() { return rows_offloaded_.exchange(0); }

 private:
  // Where `id`'s steps put their chunks.
  struct Assignment {
    uint64_t epoch = 0;
    int64_t step = -1;
    std::vector<std::string> hosts;  // Chunk c's at c - 1.
  };

  // Chunk `chunk`'s host at (epoch, step), "" when it has none.
  std::string HostOf(const ShardId& id, uint64_t epoch, int64_t step,
                     int chunk) const REQUIRES(mu_);
  // The hosts a step may use, in order.
  std::vector<std::string> Candidates() const REQUIRES(mu_);
  void Failed(const std::string& host, const Status& why) EXCLUDES(mu_);
  std::shared_ptr<Pending> Send(const std::string& host,
                                transport::Message message, Deadline deadline)
      EXCLUDES(mu_);

  const std::string name_;
  transport::DataPlane* const peers_;
  const std::function<void()> answered_;
  const std::chrono::milliseconds budget_;
  // training.compute_dtype: the form of the weights pushed
  // (WeightsForCopies).
  const DType compute_;
  // Weights pushed to copies (fresh memory costs a page fault per 4 KiB).
  const std::shared_ptr<BufferPool> pool_;
  std::atomic<int64_t> chunks_{0}, shares_{0}, failures_{0};
  std::atomic<uint64_t> rows_offloaded_{0};
  mutable Mutex mu_;
  uint64_t epoch_ GUARDED_BY(mu_) = 0;
  // The table's other workers: addresses by name, and their addresses by
  // shard bytes, then name.
  std::map<std::string, std::string> addresses_ GUARDED_BY(mu_);
  std::vector<std::string> by_bytes_ GUARDED_BY(mu_);
  std::vector<std::string> ranking_ GUARDED_BY(mu_);  // SetCopyHosts.
  std::map<ShardId, Assignment> assigned_ GUARDED_BY(mu_);
  std::set<std::string> failed_ GUARDED_BY(mu_);
  // Which (host, shard) has the weights of which (epoch, step).
  std::map<std::pair<std::string, ShardId>, std::pair<uint64_t, int64_t>>
      weights_ GUARDED_BY(mu_);
  // Weights pushed ahead (PushAhead), not yet taken by a forward.
  struct Ahead {
    uint64_t epoch = 0;
    int64_t step = -1;
    std::shared_ptr<Pending> push;
  };
  std::map<std::pair<std::string, ShardId>, Ahead> ahead_ GUARDED_BY(mu_);
};

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_REPLICA_CLIENT_H_
