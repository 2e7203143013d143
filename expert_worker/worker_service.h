// The expert shards a worker hosts, and the synchronous step protocol
// (DESIGN.md, "One synchronous training step").
//
// For step t a trainer sends, per expert shard of each MoE layer and
// micro-batch, a forward request (x -> y, activations kept) and a backward
// request (dy -> dx, the weight-gradient inputs kept), with no payload where
// it routed no tokens to the shard, then StepDone(t, rank). A shard
// computes a micro-batch's forward (and backward) once every trainer's
// request for it has come, as one batch of every rank's rows in rank order,
// and answers each trainer its rows. When StepDone(t) has come from every
// trainer, each shard's weight gradient is computed in one GEMM over the
// contributions concatenated in (micro-batch, trainer rank) order, never
// arrival order, and checked (a shard whose every micro-batch's backward
// has come gets its gradient computed earlier, while the worker has
// nothing else to do: the same GEMM, so the same bits); requests for step
// t + 1 wait
// until then. The optimizer then applies update t shard by shard, off the
// trainers' critical path: a shard's before its next request, the rest
// while the worker has nothing else to do (or before a checkpoint, a
// digest or a routing change reads the shards). Requests for applied
// steps, from another epoch, or for shards this worker does not host are
// refused.
//
// When update training.steps - 1 is applied (the run's end), the worker logs
// the digest of every shard it hosts.
//
// An eval request (validation, sampling) is a forward for step t that keeps
// nothing and counts no load. A probe is answered at any epoch, in turn
// with the other requests: a trainer whose request went unanswered asks it
// before it reports this worker lost (it may rightly be waiting for
// another trainer's request or StepDone).
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
// The service is a composition of named parts: ShardFactory (new shards
// and their initial values), ShardCompute (forward, backward and update of
// expert and dense shards), StepGate (epoch and step checks, deferred
// requests, gathering every rank's expert requests, StepDone counting),
// CheckpointWriter (staging and the write loop), ShardTransfer and
// CheckpointFetchServer (restore, replication, serving peers) and PlanRouting
// (what a routing table means here). This class owns them, its threads and the
// hosted shards.
//
// Thread-safety: all methods are thread-safe. Handle() only queues (it never
// waits for computation); one compute thread runs requests in order (the
// GEMM libraries parallelise each product).
#ifndef SWITCHYARD_EXPERT_WORKER_WORKER_SERVICE_H_
#define SWITCHYARD_EXPERT_WORKER_WORKER_SERVICE_H_

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/buffer_pool.h"
#include "common/ids.h"
#include "common/mutex.h"
#include "common/status.h"
#include "common/work_queue.h"
#include "config.pb.h"
#include "control.pb.h"
#include "expert_worker/checkpoint_writer.h"
#include "expert_worker/gemm.h"
#include "expert_worker/hosted_shard.h"
#include "expert_worker/optimizer.h"
#include "expert_worker/replica_client.h"
#include "expert_worker/replica_host.h"
#include "expert_worker/routing_plan.h"
#include "expert_worker/shard_compute.h"
#include "expert_worker/shard_factory.h"
#include "expert_worker/shard_transfer.h"
#include "expert_worker/step_gate.h"
#include "expert_worker/worker_task.h"
#include "storage/checkpoint_store.h"
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
  void Shutdown() EXCLUDES(mu_);

  // Adopts a routing table of a new epoch: the shards it places on this
  // worker and the step the cluster continues from (its resume step;
  // RoutingPlan). The epoch is adopted at once: from then on requests of
  // older epochs are refused, the step in flight is abandoned (partial
  // gradients dropped, deferred requests refused), and requests of the new
  // epoch are answered not ready (ABORTED) until the shards are in place:
  // kept ones, made ones (initial values at step 0, else restored from the
  // committed checkpoint at the resume step: local store, holder, replicas),
  // and all of them rolled back when the worker has trained to another
  // step. Shards are made and restored without holding the worker's state
  // lock. A table that fails (e.g. no copy of a shard is reachable) leaves
  // the epoch closed, and the next table (or the same epoch again) retries.
  // A table of the adopted epoch changes nothing but this worker's
  // incarnation in it. Tables are applied one at a time.
  //
  // A hold (RoutingTable.hold: a trainer died or came back) fences the
  // same way but keeps the step's partial gradients and serves nothing:
  // the worker reports where it stopped (held(), in its heartbeats) and
  // waits for the next epoch. When that one continues from the step after
  // this worker's (RoutingTable.continues: every trainer had finished the
  // step, some workers applied it), the worker applies the update from the
  // gradients it holds; otherwise the step's partial gradients are dropped.
  Status ApplyRouting(const control::RoutingTable& routing)
      EXCLUDES(apply_mu_, mu_);
  // The same on the worker's routing thread, so that a caller on a control
  // thread (heartbeats) never waits for initialisation or a restore. Only
  // the newest offered table is applied; a table that cannot be adopted
  // yet is logged and tried again after a second, or the next one is.
  void OfferRouting(const control::RoutingTable& routing) EXCLUDES(routing_mu_);

  // Checkpoints (DESIGN.md "Checkpoints"): every checkpoint.every steps
  // and at the run's end (training.steps or stop_at_step), at the step
  // boundary, the worker copies its shards (a staging copy)
  // and a background thread writes them to `store`, then calls `report`
  // with their manifests' digests. One checkpoint is in flight at a time:
  // when the next is due while one is still being written, the new one is
  // skipped (logged; training never waits for the disk), except the run's
  // last, which is queued behind the write. Call before Start.
  using CheckpointReporter = CheckpointWriter::Reporter;
  void EnableCheckpoints(std::unique_ptr<storage::CheckpointStore> store,
                         CheckpointReporter report);
  // The data plane this worker fetches checkpointed shards from its peers
  // with, when its own store lacks them (a resume on other workers) or
  // holds a damaged copy. Not owned; set before the first routing table.
  void SetPeerPlane(transport::DataPlane* plane);
  // Copies `task`'s shards from the source worker's checkpoint into this
  // worker's store (every chunk verified at the source, digest here), in
  // the background, then reports them as replicas (checkpoint.replicas).
  void Replicate(control::ReplicationTask task);
  // Drops local checkpoints older than `step` (the coordinator's
  // keep_from_step).
  void DropCheckpointsBefore(int64_t step);
  // The coordinator's newest committed checkpoint (heartbeat acks): the
  // copy kept in memory for rollbacks (checkpoint.rollback_in_memory).
  void NoteCommitted(int64_t step);
  // Blocks until no checkpoint write is in flight (tests, shutdown).
  void WaitCheckpointsWritten();

  // The data-plane request handler. Never blocks.
  void Handle(transport::Message request, transport::Reply reply);

  // Where this worker stopped at a hold, while it holds.
  struct Held {
    uint64_t epoch = 0;
    int64_t step = 0;      // Its next step then (updates applied).
    bool serving = false;  // It was serving its shards then.
  };
  // Never waits for the compute thread (heartbeats call it).
  std::optional<Held> held() const EXCLUDES(held_mu_);
  // Called (on the routing thread) with news the coordinator waits for:
  // the worker started holding, or has the shards of a new epoch in place
  // (open_epoch()). Its report should go out at once rather than with the
  // next heartbeat. Set before Start.
  void SetOnNews(std::function<void()> on_news) {
    on_news_ = std::move(on_news);
  }
  // The newest epoch whose shards are in place and served (0: none yet).
  uint64_t open_epoch() const {
    return open_epoch_.load(std::memory_order_acquire);
  }
  // Every shard moved live up to `epoch` is in place at its new home
  // (HeartbeatAck.moves_done_epoch): what this worker handed over goes.
  void NoteMovesDone(uint64_t epoch) EXCLUDES(handover_mu_);

  // The next step this worker accepts (= updates applied so far).
  int64_t next_step() const EXCLUDES(mu_);
  uint64_t epoch() const EXCLUDES(mu_);
  std::vector<ShardId> hosted() const EXCLUDES(mu_);
  // Digest (hex) of each hosted shard's parameter and optimizer-state
  // tensors, by shard name ("D0", "L0.E3.S0"), for determinism checks;
  // none after an update failed half way.
  std::map<std::string, std::string> ShardDigests() const EXCLUDES(mu_);
  // CombineDigests(ShardDigests()).
  std::string ParameterDigest() const;
  // Bytes of idle checkpoint staging buffers (kept between checkpoints).
  size_t StagingCachedBytes() const { return staging_pool_->cached_bytes(); }
  // A copy of every hosted shard's state (deep: safe to keep), as written
  // to checkpoints; none after an update failed half way.
  std::vector<storage::ShardSnapshot> Snapshots() const EXCLUDES(mu_);
  // Training tokens each hosted expert shard served since the last call
  // (heartbeats report them). Never waits for the compute thread.
  std::vector<control::ShardLoad> TakeLoads() EXCLUDES(loads_mu_);
  // Hot-expert replication's part of a heartbeat (nothing without it): the
  // rows this worker computed as copies of other workers' shards and the
  // rows of its shards computed elsewhere since the last call, and the
  // memory its copies hold.
  void AnnotateReplication(control::Heartbeat* beat);
  // The coordinator's ranking of workers for copies (HeartbeatAck.
  // copy_hosts).
  void SetCopyHosts(std::vector<std::string> names);

 private:
  void Run();
  // Serves, defers or refuses one request.
  void Process(Task task) REQUIRES(mu_);
  // A shard's gathered requests computed (`s`, answers `outs`): answers
  // them, counts the forward's tokens and notes a gradient now due.
  void AnswerLocked(std::vector<Task>* tasks, ExpertShard* shard,
                    transport::MessageKind kind, const Status& s,
                    std::vector<Tensor>* outs) REQUIRES(mu_);
  // Finishes the oldest unfinished computation (unfinished_), waiting for
  // its copies when they have not answered; false when there is none.
  bool FinishOldestLocked() REQUIRES(mu_);
  // Finishes those whose copies have answered, oldest first.
  void FinishReadyLocked() REQUIRES(mu_);
  // Finishes every one: before anything that changes, moves or drops the
  // shards or their step's state (a StepDone, a routing change, the end).
  void FinishAllLocked() REQUIRES(mu_);
  // Counts StepDone(t, rank); the last one applies update t, then the
  // requests deferred for t + 1 run, in arrival order, before any other.
  Status StepDone(const transport::WireHeader& h) REQUIRES(mu_);
  Status Dense(const transport::Message& request, Tensor* out) REQUIRES(mu_);
  // Update `step`: every shard's gradient computed and checked (all or
  // nothing), then applied shard by shard, lazily: a shard's update runs
  // before its next request, or when the compute thread is idle, or before
  // anything reads the shards (snapshots, digests, routing changes), so the
  // optimizer is off the trainers' critical path (the last StepDone is
  // answered once the gradients are checked).
  Status ApplyUpdate(int64_t step) REQUIRES(mu_);
  // Applies the pending update to `shard` (nothing if it has none); a
  // failure is kept and answers every later request.
  Status SettleLocked(ExpertShard* shard) const REQUIRES(mu_);
  Status SettleLocked(DenseShard* shard) const REQUIRES(mu_);
  // Every shard's pending update (dense shards first, then in shard order).
  Status SettleAllLocked() const REQUIRES(mu_);
  // Drops every shard's computed, unapplied gradient.
  void DropGradientsLocked() const REQUIRES(mu_);
  // Records a failed apply (nothing more of the update is applied; requests
  // are refused until a rollback remakes the shards) and returns it.
  Status ApplyFailedLocked(const Status& why, const std::string& shard) const
      REQUIRES(mu_);
  // One shard's pending update; false when none was left.
  bool SettleNextLocked() REQUIRES(mu_);
  // One due shard's gradient of the step in progress, ahead of the step's
  // StepDones (ShardCompute::EarlyGradients), if any is due; false when
  // none was.
  bool EarlyGradientsLocked() REQUIRES(mu_);
  // Sets held_ and its copy for held().
  void SetHeld(std::optional<Held> held) REQUIRES(mu_) EXCLUDES(held_mu_);
  // Applies update next_step() (every trainer's StepDone has come, or a
  // hold's next epoch continues past it), then runs the requests deferred
  // for the next step and AfterUpdate.
  Status CompleteStep() REQUIRES(mu_);
  // After update next_step() - 1: stages the checkpoint due there, if any,
  // and logs the digests at the run's end.
  void AfterUpdate() REQUIRES(mu_);
  std::map<std::string, std::string> ShardDigestsLocked() const REQUIRES(mu_);
  // Every hosted shard's tensors at the gate's step, shallow (sharing
  // storage) or deep copies.
  std::vector<storage::ShardSnapshot> SnapshotsLocked(bool deep) const
      REQUIRES(mu_);
  void RoutingLoop() EXCLUDES(routing_mu_);
  // In a live move (a `continues` table), keeps the state of the shards
  // this worker hands over (RoutingEntry.moved_from) for their new homes to
  // fetch, until NoteMovesDone; a rollback (a table that does not
  // continue) drops everything handed over.
  void HandOver(const control::RoutingTable& routing, const RoutingPlan& plan)
      EXCLUDES(mu_, handover_mu_);
  // Makes, zero-filled, the shards a pause table plans to move here
  // (RoutingEntry.moving_to) and keeps them for the epoch that moves them
  // (ApplyRouting); drops those made ahead that the table no longer plans
  // here.
  void Premake(const control::RoutingTable& routing) REQUIRES(apply_mu_)
      EXCLUDES(mu_);
  // CheckpointFetchServer::Handovers.
  StatusOr<std::shared_ptr<const storage::ShardSnapshot>> HandedOver(
      uint64_t epoch, int64_t step, const std::string& shard) const
      EXCLUDES(handover_mu_);
  // Gives compute_ its ReplicaClient once it and the peer plane exist
  // (replication.enabled).
  void ConnectReplicas();
  // Shards written or restored at a time: the compute thread count
  // (training.threads, else one per core).
  int StorageThreads() const;

  const config::SwitchyardConfig config_;
  const std::string name_;
  std::unique_ptr<Gemm> gemm_;
  std::unique_ptr<Optimizer> optimizer_;
  std::unique_ptr<ShardFactory> factory_;
  std::unique_ptr<ShardCompute> compute_;
  std::shared_ptr<BufferPool> pool_;  // Request and gradient-input buffers.
  // Checkpoint staging copies. With checkpoint.staging_resident (the
  // default) kept whole between checkpoints (a staging copy needs them
  // anyway), so a checkpoint's step never waits for fresh memory's first
  // touch, and touched when the shards are made (ApplyRouting); without
  // it, returned to the system after every write.
  const std::shared_ptr<BufferPool> staging_pool_;

  // Checkpoints: all null without a store.
  std::unique_ptr<storage::CheckpointStore> store_;
  CheckpointReporter report_;
  std::unique_ptr<CheckpointWriter> writer_;
  std::unique_ptr<CheckpointFetchServer> fetch_server_;
  transport::DataPlane* peers_ = nullptr;  // Not owned.
  std::unique_ptr<ShardTransfer> transfer_;
  // Hot-expert replication (replication.enabled): the copies this worker
  // hosts for others, with a GEMM of their own, and the way to its own
  // shards' copies.
  std::unique_ptr<Gemm> replica_gemm_;
  std::unique_ptr<ReplicaHost> replica_host_;
  std::unique_ptr<ReplicaClient> replica_client_;

  // NOTE: Handle(), on the data plane's progress thread, never waits for a
  // GEMM: it only pushes to queue_ (its own lock, never held while
  // computing); mu_ guards the shards and the step state and is held while
  // a request is processed.
  WorkQueue<Task> queue_;
  std::thread thread_;  // The compute thread (Run).

  // Held while a table is applied: one at a time.
  Mutex apply_mu_ ACQUIRED_BEFORE(mu_);
  // Shards made ahead of a planned live move (Premake), taken by the epoch
  // that moves them here; dropped at any other epoch.
  std::map<ShardId, std::unique_ptr<ExpertShard>> premade_
      GUARDED_BY(apply_mu_);
  std::map<int, std::unique_ptr<DenseShard>> premade_dense_
      GUARDED_BY(apply_mu_);
  mutable Mutex mu_;
  StepGate gate_ GUARDED_BY(mu_);
  // gate_'s epoch, readable without mu_ (the checkpoint fetch server's: it
  // must not wait on a worker busy with a step).
  std::atomic<uint64_t> adopted_epoch_{0};
  std::optional<Held> held_ GUARDED_BY(mu_);
  // The update computed and not yet applied to every shard (-1: none), and
  // how many shards still wait for it; a failure to apply it. Mutable: a
  // reader of the shards (a const snapshot) applies it first.
  mutable int64_t pending_update_ GUARDED_BY(mu_) = -1;
  mutable int unsettled_ GUARDED_BY(mu_) = 0;
  mutable Status apply_failed_ GUARDED_BY(mu_);
  // Shards whose every micro-batch's backward has come, in that order: the
  // compute thread computes their gradients while idle.
  std::vector<ShardId> gradients_due_ GUARDED_BY(mu_);
  // Forwards and backwards of replicated shards whose chunks on copies
  // elsewhere are still computing, oldest first: the compute thread serves
  // other requests meanwhile (ShardCompute::Unfinished).
  struct Unfinished {
    std::vector<Task> tasks;
    ExpertShard* shard;
    transport::MessageKind kind;
    ShardCompute::Unfinished rest;
  };
  std::deque<Unfinished> unfinished_ GUARDED_BY(mu_);
  // Ends the compute thread's wait for requests when a copy answers
  // (ReplicaClient's `answered`), for as long as the thread runs: the data
  // plane may call it later.
  struct Waker {
    Mutex mu;
    WorkQueue<Task>* queue GUARDED_BY(mu) = nullptr;
  };
  const std::shared_ptr<Waker> waker_ = std::make_shared<Waker>();
  // held_'s copy for held(), readable without mu_: heartbeats read it, and
  // must not wait behind a long computation (the lease would expire).
  mutable Mutex held_mu_ ACQUIRED_AFTER(mu_);
  std::optional<Held> held_published_ GUARDED_BY(held_mu_);
  std::function<void()> on_news_;
  std::atomic<uint64_t> open_epoch_{0};
  // Shards handed over in a live move, by name, and the newest epoch
  // whose handover is done.
  struct HandedOverShard {
    uint64_t epoch = 0;
    int64_t step = 0;
    std::shared_ptr<const storage::ShardSnapshot> snapshot;
  };
  mutable Mutex handover_mu_;
  std::map<std::string, HandedOverShard> handed_over_ GUARDED_BY(handover_mu_);
  uint64_t handover_epoch_ GUARDED_BY(handover_mu_) = 0;
  // This worker's incarnation in the adopted routing table (0: not in it):
  // what its checkpoints' reports carry.
  uint64_t adopted_incarnation_ GUARDED_BY(mu_) = 0;
  std::map<ShardId, std::unique_ptr<ExpertShard>> shards_ GUARDED_BY(mu_);
  // Training tokens per hosted expert shard since the last TakeLoads, under
  // their own lock: heartbeats read them and must not wait behind a long
  // computation.
  // With each shard's replicas, as of its last update (1: none).
  struct LoadCount {
    uint64_t tokens = 0;
    int replicas = 1;
  };
  mutable Mutex loads_mu_ ACQUIRED_AFTER(mu_);
  std::map<ShardId, LoadCount> loads_ GUARDED_BY(loads_mu_);
  std::map<int, std::unique_ptr<DenseShard>> dense_ GUARDED_BY(mu_);

  // The newest routing table offered and not yet applied.
  Mutex routing_mu_;
  CondVar routing_cv_;
  std::optional<control::RoutingTable> offered_ GUARDED_BY(routing_mu_);
  bool routing_stop_ GUARDED_BY(routing_mu_) = false;
  std::thread routing_thread_;
};

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_WORKER_SERVICE_H_
