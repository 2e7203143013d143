// Moving checkpointed shards between workers over the data plane: fetching
// a shard's checkpoint from a peer (tensor by tensor, each verified at the
// source), restoring the shards a worker is given at a routing table's
// resume step (a copy kept in memory first, then the local store, else
// the shard's holder, then its replicas; what is fetched is kept locally),
// replication tasks (a peer's checkpoint copied into the local store and
// reported as a replica), and live moves (a shard's state at a step
// boundary fetched from the worker that held it: kShardHandover).
// CheckpointFetchServer is the serving side.
//
// Thread-safety: thread-compatible; Restore runs on the routing thread and
// Replicate on the checkpoint thread, which touch no shared state here (the
// store and the data plane are thread-safe). Store, factory, data plane
// and reporter outlive it.
#ifndef SWITCHYARD_EXPERT_WORKER_SHARD_TRANSFER_H_
#define SWITCHYARD_EXPERT_WORKER_SHARD_TRANSFER_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "common/work_queue.h"
#include "config.pb.h"
#include "control.pb.h"
#include "expert_worker/checkpoint_writer.h"
#include "expert_worker/shard_factory.h"
#include "expert_worker/worker_task.h"
#include "storage/checkpoint_store.h"
#include "transport/data_plane.h"

namespace switchyard::expert_worker {

class ShardTransfer {
 public:
  // `store` may be null (a worker without checkpoints: Restore fails
  // clearly); `peers` may be null until set.
  ShardTransfer(const config::SwitchyardConfig& config, std::string name,
                storage::CheckpointStore* store, const ShardFactory* factory,
                int threads)
      : config_(config),
        name_(std::move(name)),
        store_(store),
        factory_(factory),
        threads_(threads) {}

  void set_peers(transport::DataPlane* peers) { peers_ = peers; }
  // Where Restore looks first: this worker's checkpoints kept in memory
  // (CheckpointWriter::KeptAt). Set before the first Restore.
  using MemoryCopies =
      std::function<std::shared_ptr<const KeptCheckpoint>(int64_t step)>;
  void set_memory(MemoryCopies memory) { memory_ = std::move(memory); }

  // The checkpoint of `like`'s shard at `step` from the worker at data
  // address `address`, into tensors shaped like `like`'s; the requests
  // carry `epoch`, the routing epoch this worker fetches under. With
  // `handover`, the shard's live state that worker handed over at `step`
  // in a move of `epoch` instead (requests answered not ready, ABORTED,
  // are retried until the request deadline: the old home may not have
  // adopted the epoch yet).
  StatusOr<storage::ShardSnapshot> Fetch(const std::string& address,
                                         uint64_t epoch, int64_t step,
                                         const storage::ShardSnapshot& like,
                                         bool handover = false);
  // Fills `shards` (sharing storage with shards not yet hosted) with their
  // state handed over by their old homes (RoutingEntry.moved_from) at
  // routing.resume_step() in a live move.
  Status TakeOver(const control::RoutingTable& routing,
                  std::vector<storage::ShardSnapshot> shards);
  // Fills `shards` (sharing storage with shards not yet hosted) with their
  // checkpoint at routing.resume_step(): a copy kept in memory, else the
  // local store, else a peer's; every copy is checked against the
  // committed digest and every tensor against the model's.
  Status Restore(const control::RoutingTable& routing,
                 std::vector<storage::ShardSnapshot> shards);
  // Copies `task`'s shards from the source's checkpoint into the store and
  // reports them (report.replica set).
  Status Replicate(const control::ReplicationTask& task,
                   const CheckpointWriter::Reporter& report);

 private:
  // Copies `saved`'s tensors into `live`'s when every one fits (names,
  // dtypes, shapes); nothing is copied otherwise.
  static Status CopyTensors(const storage::ShardSnapshot& saved,
                            storage::ShardSnapshot* live);

  const config::SwitchyardConfig& config_;
  const std::string name_;
  storage::CheckpointStore* const store_;
  const ShardFactory* const factory_;
  const int threads_;
  transport::DataPlane* peers_ = nullptr;
  MemoryCopies memory_;
};

// Serves peers' kCheckpointFetch requests from the store, one tensor per
// request, on a thread of its own: off the compute thread and off the
// worker's locks (two workers restoring from each other must not wait on
// each other); and their kShardHandover requests from the shards handed
// over, at once on the calling thread (a lookup under the handover lock,
// no disk). Every queued request is answered, at shutdown too.
//
// Thread-safety: Serve is thread-safe; Start and Shutdown are called once.
class CheckpointFetchServer {
 public:
  // A shard this worker handed over (kShardHandover's epoch, step, shard):
  // its state, ABORTED while the worker has not handed that epoch's shards
  // over yet, NOT_FOUND when it has and this is not among them.
  using Handovers =
      std::function<StatusOr<std::shared_ptr<const storage::ShardSnapshot>>(
          uint64_t epoch, int64_t step, const std::string& shard)>;
  // `current_epoch`: the worker's routing epoch (thread-safe); a fetch from
  // an older epoch is refused. `store` may be null (no checkpoints: only
  // handovers are served).
  CheckpointFetchServer(std::string name, storage::CheckpointStore* store,
                        std::function<uint64_t()> current_epoch,
                        Handovers handovers)
      : name_(std::move(name)),
        store_(store),
        current_epoch_(std::move(current_epoch)),
        handovers_(std::move(handovers)) {}
  ~CheckpointFetchServer() { Shutdown(); }

  void Start();
  void Shutdown();
  // Queues `task` (a checkpoint fetch: a disk read), or answers it at once:
  // when shut down, and a handover (kShardHandover: memory only, so that
  // a live move never waits behind checkpoint reads, e.g. the copies of a
  // draining worker's checkpoints that its drain starts).
  void Serve(Task task);

 private:
  void Loop();
  void ServeHandover(Task& task);

  const std::string name_;
  storage::CheckpointStore* const store_;
  const std::function<uint64_t()> current_epoch_;
  const Handovers handovers_;
  WorkQueue<Task> queue_;
  std::atomic<bool> stopped_{false};
  std::thread thread_;
};

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_SHARD_TRANSFER_H_
