// The expert shards a worker hosts, and the synchronous step protocol
// (DESIGN.md, "One synchronous training step").
//
// For step t a trainer sends, per expert shard it routed tokens to, a forward
// request (x -> y, activations kept) and a backward request (dy -> dx, the
// weight-gradient inputs kept), then StepDone(t, rank). When StepDone(t) has
// come from every trainer, each shard's weight gradient is computed in one
// GEMM over the contributions concatenated in (trainer rank, micro-batch)
// order, never arrival order, and the optimizer applies update t. Requests
// for step t + 1 wait until then; requests for applied steps, from another
// epoch, or for shards this worker does not host are refused.
//
// When update training.steps - 1 is applied (the run's end), the worker logs
// the digest of every shard it hosts.
//
// An eval request (validation, sampling) is a forward for step t that keeps
// nothing and counts no load.
//
// Dense shards (parameter-server tables) are flat slices of the DenseLayout
// concatenation: DensePull(t) returns the parameters of version t (after t
// updates), DensePush(t, rank) delivers that rank's gradient, and update t
// sums the pushed gradients in rank order before the optimizer (AdamW, or
// Adafactor with full second moments: dense shards are flat vectors).
//
// Initial parameters are a pure function of (seed, layer, expert, global
// row, global column) for experts and (seed, dense tensor, element) for
// dense tables, so values do not depend on sharding or on which worker hosts
// a shard.
//
// Thread-safety: all methods are thread-safe. Handle() only queues (it never
// waits for computation); one compute thread runs requests in order (the
// GEMM libraries parallelise each product).
#ifndef SWITCHYARD_EXPERT_WORKER_WORKER_SERVICE_H_
#define SWITCHYARD_EXPERT_WORKER_WORKER_SERVICE_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "common/buffer_pool.h"
#include "common/ids.h"
#include "common/status.h"
#include "config.pb.h"
#include "control.pb.h"
#include "expert_worker/expert_ffn.h"
#include "expert_worker/optimizer.h"
#include "storage/checkpoint_store.h"
#include "storage/safetensors.h"
#include "transport/data_plane.h"

namespace switchyard::expert_worker {

class WorkerService {
 public:
  WorkerService(const config::SwitchyardConfig& config, std::string name);
  ~WorkerService();
  WorkerService(const WorkerService&) = delete;
  WorkerService& operator=(const WorkerService&) = delete;

  // Creates the GEMM backend and optimizer and starts the compute thread.
  Status Start();
  void Shutdown();

  // Adopts the expert shards `routing` places on this worker (allocating and
  // initialising new ones, dropping those moved away) and its epoch. A
  // worker that has applied no update yet and gets a table with
  // resume_step > 0 restores its shards from its checkpoint store at that
  // step and continues from it. New shards are made and restored without
  // holding the worker's state lock: requests of the current epoch are
  // served meanwhile, and the table is adopted whole at the end or not at
  // all. Tables are applied one at a time.
  Status ApplyRouting(const control::RoutingTable& routing);
  // The same on the worker's routing thread, so that a caller on a control
  // thread (heartbeats) never waits for initialisation or a restore. Only
  // the newest offered table is applied; a table that cannot be adopted
  // yet is logged and the next one is tried.
  void OfferRouting(const control::RoutingTable& routing);

  // Checkpoints (DESIGN.md "Checkpoints"): every checkpoint.every steps
  // and at the run's end (training.steps or stop_at_step), at the step
  // boundary, the worker copies its shards (a staging copy)
  // and a background thread writes them to `store`, then calls `report`
  // with their manifests' digests. One checkpoint is in flight at a time:
  // when the next is due while one is still being written, the new one is
  // skipped (logged; training never waits for the disk), except the run's
  // last, which is queued behind the write. Call before Start.
  using CheckpointReporter =
      std::function<Status(const control::CheckpointReport&)>;
  void EnableCheckpoints(std::unique_ptr<storage::CheckpointStore> store,
                         CheckpointReporter report);
  // The data plane this worker fetches checkpointed shards from its peers
  // with, when its own store lacks them (a resume on other workers) or
  // holds a damaged copy. Not owned; set before the first routing table.
  void SetPeerPlane(transport::DataPlane* plane) { peers_ = plane; }
  // Copies `task`'s shards from the source worker's checkpoint into this
  // worker's store (every chunk verified at the source, digest here), in
  // the background, then reports them as replicas (checkpoint.replicas).
  void Replicate(control::ReplicationTask task);
  // Drops local checkpoints older than `step` (the coordinator's
  // keep_from_step).
  void DropCheckpointsBefore(int64_t step);
  // Blocks until no checkpoint write is in flight (tests, shutdown).
  void WaitCheckpointsWritten();

  // The data-plane request handler. Never blocks.
  void Handle(transport::Message request, transport::Reply reply);

  // The next step this worker accepts (= updates applied so far).
  int64_t next_step() const;
  uint64_t epoch() const;
  std::vector<ShardId> hosted() const;
  // Digest (hex) of each hosted shard's parameter and optimizer-state
  // tensors, by shard name ("D0", "L0.E3.S0"), for determinism checks.
  std::map<std::string, std::string> ShardDigests() const;
  // CombineDigests(ShardDigests()).
  std::string ParameterDigest() const;
  // Bytes of idle checkpoint staging buffers (kept between checkpoints).
  size_t StagingCachedBytes() const { return staging_pool_->cached_bytes(); }
  // A copy of every hosted shard's state (deep: safe to keep), as written
  // to checkpoints.
  std::vector<storage::ShardSnapshot> Snapshots() const;
  // Tokens received per shard since the last call.
  std::vector<control::ShardLoad> TakeLoads();

 private:
  struct Shard;
  struct DenseShard;
  struct Task {
    transport::Message request;
    transport::Reply reply;
  };
  using ActivationKey = std::tuple<int64_t, int32_t, int32_t, ShardId>;

  void Run();
  // Executes or defers one task. Requires mu_.
  void Process(Task task);
  Status Forward(const transport::Message& request, Shard* shard, Tensor* y);
  Status Backward(const transport::Message& request, Shard* shard, Tensor* dx);
  Status StepDone(const transport::Message& request);
  // Pull or push on a dense shard; a pull fills *out.
  Status Dense(const transport::Message& request, Tensor* out);
  Status ApplyUpdate(int64_t step);
  // Before an update changes the live tensors: copies a staged checkpoint
  // still uncopied, or waits for the checkpoint thread's copy under way
  // (logging a wait over 1 ms). Requires mu_.
  Status WaitForStagingCopy(int64_t step);
  // Replaces `job`'s tensors with copies in staging buffers and logs how
  // long that took (`how`: who made it).
  void CopyForCheckpoint(std::vector<storage::ShardSnapshot>* job,
                         const char* how) const;
  // A shard with its initial values (seeded, or checkpoint.init_from), or
  // zero-filled when `initialise` is false (to be restored, or for shapes).
  StatusOr<std::unique_ptr<Shard>> NewShard(const ShardId& id,
                                            bool initialise = true) const;
  StatusOr<std::unique_ptr<DenseShard>> NewDenseShard(
      int index, bool initialise = true) const;
  // ShardDigests(); requires mu_.
  std::map<std::string, std::string> ShardDigestsLocked() const;
  // Every hosted shard's tensors at next_step_, shallow (sharing storage)
  // or deep copies. Requires mu_.
  std::vector<storage::ShardSnapshot> SnapshotsLocked(bool deep) const;
  storage::ShardSnapshot SnapshotOf(const Shard& shard, bool deep) const;
  storage::ShardSnapshot SnapshotOf(const DenseShard& shard, bool deep) const;
  // Loads `shards` (not yet hosted, so no lock is needed) at
  // routing.resume_step(): from the local store, else from the shard's
  // resume_holder or replicas over the data plane (then kept locally).
  Status Restore(const control::RoutingTable& routing,
                 std::vector<storage::ShardSnapshot> shards);
  void RoutingLoop();
  // The checkpoint of `like`'s shard at `step` from worker `address`, into
  // tensors shaped like `like`'s.
  StatusOr<storage::ShardSnapshot> FetchShard(
      const std::string& address, int64_t step,
      const storage::ShardSnapshot& like);
  // Runs one replication task (on the checkpoint thread).
  Status RunReplication(const control::ReplicationTask& task);
  void CheckpointLoop();
  // Shards written or restored at a time: the compute thread count
  // (training.threads, else one per core).
  int StorageThreads() const;
  // Serves kCheckpointFetch from the store, off the compute thread (and
  // off mu_: two workers restoring from each other must not wait on each
  // other's locks).
  void FetchServeLoop();

  const config::SwitchyardConfig config_;
  const std::string name_;
  std::unique_ptr<Gemm> gemm_;
  std::unique_ptr<Optimizer> optimizer_;
  std::unique_ptr<ExpertFfn> ffn0_, ffn_;  // Shard 0 (has b2), other shards.
  std::shared_ptr<BufferPool> pool_;  // Request and gradient-input buffers.
  // Checkpoint staging copies. With checkpoint.staging_resident (the
  // default) kept whole between checkpoints (a staging copy needs them
  // anyway), so a checkpoint's step never waits for fresh memory's first
  // touch, and touched when the shards are made (ApplyRouting); without
  // it, returned to the system after every write.
  const std::shared_ptr<BufferPool> staging_pool_;
  // checkpoint.init_from, when set: initial values of new shards.
  std::optional<storage::SafetensorsReader> init_;
  Status InitExpertFrom(const ShardId& id, ExpertParams* params) const;
  Status InitDenseFrom(int index, Tensor* params) const;

  // NOTE: two locks so that Handle(), on the data plane's progress thread,
  // never waits for a GEMM: queue_mu_ guards only the queue and is never
  // held while computing; mu_ guards the shards and the step state and is
  // held while a request is processed. Order: mu_ before queue_mu_.
  std::mutex queue_mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;  // GUARDED_BY(queue_mu_)
  bool stop_ = false;       // GUARDED_BY(queue_mu_)

  mutable std::mutex mu_;
  std::vector<Task> waiting_;                         // GUARDED_BY(mu_)
  std::map<ShardId, std::unique_ptr<Shard>> shards_;  // GUARDED_BY(mu_)
  std::map<int, std::unique_ptr<DenseShard>> dense_;  // GUARDED_BY(mu_)
  uint64_t epoch_ = 0;                                // GUARDED_BY(mu_)
  int64_t next_step_ = 0;                             // GUARDED_BY(mu_)
  std::map<int64_t, std::set<int32_t>> step_done_;    // GUARDED_BY(mu_)
  std::thread thread_;

  // The checkpoint writer: one staged checkpoint at a time.
  std::unique_ptr<storage::CheckpointStore> store_;
  CheckpointReporter report_;
  std::mutex ckpt_mu_;
  std::condition_variable ckpt_cv_;
  // The checkpoint to write. Taken at the step boundary as references to
  // the live tensors (uncopied_ true) and copied into staging buffers while
  // the next step's requests are served: by the checkpoint thread, or by
  // the next update if that thread has not begun (CopyForCheckpoint); the
  // update waits for a copy under way (WaitForStagingCopy), as it is what
  // changes the live tensors.
  std::vector<storage::ShardSnapshot> staged_;      // GUARDED_BY(ckpt_mu_)
  bool uncopied_ = false;                           // GUARDED_BY(ckpt_mu_)
  bool copying_ = false;                            // GUARDED_BY(ckpt_mu_)
  std::deque<control::ReplicationTask> replicate_;  // GUARDED_BY(ckpt_mu_)
  bool ckpt_busy_ = false;                          // GUARDED_BY(ckpt_mu_)
  bool ckpt_stop_ = false;                          // GUARDED_BY(ckpt_mu_)
  int64_t dropped_before_ = 0;                      // GUARDED_BY(ckpt_mu_)
  std::thread ckpt_thread_;

  transport::DataPlane* peers_ = nullptr;  // Not owned.
  std::mutex fetch_mu_;
  std::condition_variable fetch_cv_;
  std::deque<Task> fetches_;  // GUARDED_BY(fetch_mu_)
  bool fetch_stop_ = false;   // GUARDED_BY(fetch_mu_)
  std::thread fetch_thread_;

  std::mutex apply_mu_;  // Held while a table is applied: one at a time.
  std::mutex routing_mu_;
  std::condition_variable routing_cv_;
  std::optional<control::RoutingTable> offered_;  // GUARDED_BY(routing_mu_)
  bool routing_stop_ = false;                     // GUARDED_BY(routing_mu_)
  std::thread routing_thread_;
};

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_WORKER_SERVICE_H_
