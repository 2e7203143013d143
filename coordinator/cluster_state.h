// The coordinator's view of the cluster: members, leases, epoch, placement,
// and (through its CheckpointLedger) the committed checkpoints.
//
// A pure state machine, driven by requests and by Tick(now); no I/O, so tests
// drive it directly with chosen times. The epoch advances whenever the
// routing table changes or an incarnation is fenced; once placed, every new
// epoch also names the step the cluster continues from: a rollback to the
// newest committed checkpoint when a worker's shards were lost or moved
// (DESIGN.md, "Failures and elasticity"), or, when only a trainer died or
// came back, the step the workers reached (a hold, then an epoch that
// continues from it: nothing redone but the step in flight).
// Membership decides who may report a checkpoint and where its replicas go;
// the ledger decides when a checkpoint is committed.
//
// Planned moves (a worker joins, is drained, or ends its probation) happen
// live, with nothing rolled back or redone: the routing table asks the
// trainers to pause at the next step boundary (RoutingTable.pause); once
// every training trainer has stopped at the same boundary the cluster is
// held there (Hold), every worker reports the step it stopped at, and the
// epoch that continues from it places the shards anew, each moved shard
// naming its old home (RoutingEntry.moved_from), which hands its state
// over on the data plane. A pause that does not complete within
// cluster.move_timeout_ms, or a move whose old home is gone, is made as a
// recovery instead (a rollback to the newest committed checkpoint).
//
// Thread-compatible: the owner (CoordinatorService) serializes all calls.
#ifndef SWITCHYARD_COORDINATOR_CLUSTER_STATE_H_
#define SWITCHYARD_COORDINATOR_CLUSTER_STATE_H_

#include <chrono>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/model_shape.h"
#include "common/status.h"
#include "config.pb.h"
#include "control.pb.h"
#include "coordinator/checkpoint_ledger.h"
#include "coordinator/placement.h"
#include "coordinator_state.pb.h"

namespace switchyard::coordinator {

using Clock = std::chrono::steady_clock;

class ClusterState {
 public:
  // A fresh run at epoch 1, nothing placed.
  explicit ClusterState(const config::SwitchyardConfig& config);

  // Resumes from a persisted snapshot, at its epoch (the members' routing
  // tables stay in force: a coordinator restart alone changes nothing for
  // them). Members that were alive become UNCONFIRMED with a grace of two
  // leases from `now` to re-register. Fails if the snapshot's model differs
  // from `config`'s.
  static StatusOr<ClusterState> Restore(
      const config::SwitchyardConfig& config,
      const control::CoordinatorSnapshot& snapshot, Clock::time_point now);

  control::CoordinatorSnapshot Snapshot() const;

  StatusOr<control::RegisterResponse> Register(
      const control::RegisterRequest& request, Clock::time_point now);
  // Renews the lease. FAILED_PRECONDITION ("fenced") when the incarnation is
  // not the member's current live one.
  StatusOr<control::HeartbeatAck> Heartbeat(const control::Heartbeat& beat,
                                            Clock::time_point now);
  Status Leave(const control::Leave& leave);
  // Records that a current worker's shards are durable at report.step()
  // (CheckpointLedger::Record) and, for a holder's new report, queues their
  // replication; FAILED_PRECONDITION when the reporter is not a current
  // worker.
  StatusOr<control::CheckpointReportAck> ReportCheckpoint(
      const control::CheckpointReport& report);
  // Where training (re)starts: from scratch with `fresh`, else from the
  // committed checkpoint `from_step` (0: the newest). Call before members
  // register.
  // A --fresh start also names a new run (run_id).
  Status ChooseResumeStep(bool fresh, int64_t from_step) {
    if (fresh) NewRunId();
    return ledger_.ChooseResumeStep(fresh, from_step);
  }
  int64_t resume_step() const { return ledger_.resume_step(); }
  // A member could not reach a worker (its data-plane connection failed
  // with requests pending): that worker incarnation, if still current, is
  // fenced as dead at once. FAILED_PRECONDITION when the reporter is not
  // current.
  StatusOr<control::PeerLostAck> PeerLost(const control::PeerLost& report,
                                          Clock::time_point now);
  // Drains `request.worker()` (its shards move live to the others, then it
  // is told to leave: HeartbeatAck.drained), or with cancel stops draining
  // it. RESOURCE_EXHAUSTED, changing nothing, when the others cannot hold
  // its shards; NOT_FOUND / FAILED_PRECONDITION for no such live worker.
  StatusOr<control::DrainResponse> Drain(const control::DrainRequest& request,
                                         Clock::time_point now);
  // Declares members whose lease expired dead; ends probations; gives up
  // on a pause past cluster.move_timeout_ms.
  void Tick(Clock::time_point now);
  // `name`'s control connection closed: a live process reconnects and
  // re-registers at once, so its lease is cut to two heartbeat periods
  // (a killed process is fenced then, well before its lease would end).
  void ConnectionLost(const std::string& name, Clock::time_point now);

  uint64_t epoch() const { return epoch_; }
  // Incremented on every change that must be persisted.
  uint64_t version() const { return version_ + ledger_.version(); }
  // Incremented whenever Routing() may have changed (a new epoch, or a
  // worker's address confirmed within an epoch): the table is pushed again.
  uint64_t routing_version() const { return routing_version_; }
  control::RoutingTable Routing() const;
  control::StatusResponse Report(Clock::time_point now) const;
  const config::SwitchyardConfig& config() const { return config_; }

 private:
  struct Member {
    control::MemberRecord record;
    Clock::time_point lease_deadline;
    Clock::time_point last_heartbeat;
    // ShardId string -> training tokens between the member's last two
    // heartbeats.
    std::map<std::string, uint64_t> tokens;
    // When this name was declared dead (workers; within the crash-loop
    // window), and whether the current incarnation is on probation (a
    // crash loop: no shards until probation_until).
    std::vector<Clock::time_point> deaths;
    bool on_probation = false;
    Clock::time_point probation_until;
    // Trainers, from heartbeats: the epoch trained under (0: waiting) and
    // the last step begun.
    uint64_t training_epoch = 0;
    int64_t step = -1;
    // Trainers: stopped at the boundary before paused_step (a pause).
    bool paused = false;
    int64_t paused_step = 0;
    // Workers: the newest epoch whose shards it serves.
    uint64_t open_epoch = 0;
    // Trainers: heartbeated since this coordinator (re)started.
    bool reported = false;
    // Workers with hot-expert replication, from their last heartbeat:
    // Heartbeat.copy_tokens, offloaded_tokens, copy_bytes, and the
    // loads of their replicated shards (ShardLoad.replicas > 1).
    uint64_t copy_tokens = 0;
    uint64_t offloaded_tokens = 0;
    int64_t copy_bytes = 0;
    std::vector<control::ShardLoad> replicated;
  };

  bool IsLive(const Member& m) const;
  int NumLiveWorkers() const;
  // HeartbeatAck.copy_hosts: the confirmed workers not draining or on
  // probation, by their own shards' tokens, least first, then by name;
  // ranked again at most once per cluster.heartbeat_ms.
  const std::vector<std::string>& CopyHosts(Clock::time_point now);
  // Recomputes placement if the first placement has been made (or can now be
  // made), advancing the epoch. With `live` (nothing was lost: a join, a
  // drain, a probation's end) and every shard on a live worker, the moves
  // are planned for the next step boundary (a pause) instead.
  // NOTE: `now` matters only with `live` (when the pause began, for
  // cluster.move_timeout_ms); callers with `live` must pass it.
  void Replace(const std::string& why, bool live = false,
               Clock::time_point now = Clock::time_point());
  // The placement input of the moment: live workers not on probation and
  // not draining, in name order, with their token loads and the shards'
  // current homes.
  PlacementInput CurrentPlacementInput() const;
  // Makes `result` (of `input`) the placement; true when a shard's home
  // changed. Records the placement error.
  bool AdoptPlacement(const PlacementInput& input,
                      const PlacementResult& result);
  // After a rollback's BumpEpoch: places the shards anew (the moves a pause
  // or hold was for), restored from the checkpoint like every shard.
  void PlaceWithRollback();
  // `result` (of `input`) places every shard and moves at least one.
  bool MovesAny(const PlacementInput& input,
                const PlacementResult& result) const;
  // Every shard is placed, on a live worker not on probation.
  bool AllShardsOnLiveWorkers() const;
  // Asks the trainers to stop at the next step boundary for a move.
  void StartPause(const std::string& why, Clock::time_point now);
  // planned_home_: the placement the boundary would make now.
  void PlanPausedMoves();
  // Every trainer training under this epoch has stopped at one boundary
  // (or none trains): hold there. Stopped at different ones: the others
  // are asked to go on to the furthest.
  void MaybeEndPause(Clock::time_point now);
  // In an epoch that continues from a hold: places the shards anew and
  // records what moves live (moved_from_); nothing moves when a shard
  // would be left without a home (the drains are called off, saying why).
  void PlaceAtBoundary(Clock::time_point now);
  // Stops every drain (the others cannot hold the shards: `why`); true
  // when there was one.
  bool CallOffDrains(const std::string& why);
  // Queues copies of the kept committed checkpoints' shards whose only
  // copy is on a draining worker onto their new homes (replication tasks),
  // so that neither a rollback nor a resume from an older kept checkpoint
  // needs a drained worker's store.
  void CopyCommittedOffDrains(Clock::time_point now);
  // After a restart: some live trainer has not heartbeated yet (within
  // two leases), so where the trainers are is not known.
  bool TrainersUnknown(Clock::time_point now) const;
  // Every worker holding shards serves the epoch that moved them.
  void MaybeFinishMoves();
  int ShardsHeldBy(const std::string& name) const;
  void Fence(Member* member, control::MemberState state, const std::string& why,
             Clock::time_point now);
  // A worker's process is gone (`now`): counted towards a crash loop.
  void RecordDeath(Member* member, Clock::time_point now);
  // A new epoch. Once placed (after the first placement) it is a rollback:
  // the ledger's resume step becomes the newest committed checkpoint, and
  // moves a pause or its hold was for are made with it (PlaceWithRollback;
  // by the caller when `place_moves` is false). Returns whether there
  // were such moves.
  bool BumpEpoch(const std::string& why, bool place_moves = true);
  // A trainer died or a new trainer incarnation came (once placed): a new
  // epoch that holds the cluster (RoutingTable.hold) until every worker
  // holding shards has reported the step it stopped at; then EndHold.
  // Nothing rolls back. Within a hold, another such event changes nothing.
  void Hold(const std::string& why);
  // Every shard holder has reported: the next epoch continues from the
  // step they reached (RoutingTable.continues), or, when they are not one
  // update apart or one was not serving, rolls back (BumpEpoch).
  void MaybeEndHold(Clock::time_point now);
  // Appends a recovery (a new epoch of a placed cluster) to the record;
  // `began_unix_ms` 0: now.
  void RecordRecovery(const std::string& why, int64_t resume_step,
                      bool rolled_back, int64_t began_unix_ms = 0);
  // Recoveries every live trainer now trains past get their duration.
  void FinishRecoveries();

  config::SwitchyardConfig config_;
  std::vector<ShardFootprint> shards_;
  std::map<std::string, Member> members_;
  // Gives the run a new random name.
  void NewRunId();

  uint64_t epoch_ = 1;
  uint64_t next_incarnation_ = 1;
  std::string run_id_;
  uint64_t version_ = 0;
  uint64_t routing_version_ = 0;
  bool placed_ = false;
  std::vector<std::string> shard_home_;
  std::vector<bool> shard_unplaced_;
  std::string placement_error_;
  // Replicas each shard needs: checkpoint.replicas, at most the other live
  // workers.
  size_t ReplicasWanted() const;
  // Queues replication of `report`'s shards onto other live workers
  // (distinct hosts first).
  void AssignReplicas(const control::CheckpointReport& report);
  // The last kMaxRecoveries recoveries, oldest first, and how many in all.
  static constexpr int kMaxRecoveries = 16;
  std::vector<control::Recovery> recoveries_;
  int64_t recoveries_total_ = 0;
  // A hold in progress (Hold), why, and what each worker reported of it
  // (by name): the step it stopped at and whether it was serving.
  bool holding_ = false;
  std::string hold_cause_;
  std::string epoch_cause_;  // Why epoch_ began (RoutingTable.cause).
  int64_t hold_began_unix_ms_ = 0;
  std::map<std::string, std::pair<int64_t, bool>> held_;
  // The current epoch continues a hold (RoutingTable.continues).
  bool continues_ = false;
  // The last hold that continued: its epoch, the step it continued from,
  // and the workers (name, incarnation) serving at it; -1 when it moved
  // shards. A hold that begins in that very epoch (hold_after_continue_:
  // its step, else -1) accepts a worker that reports it was not serving
  // but is one of those, at that step, with nobody past it: it never
  // adopted the continuing epoch (only the newest table reaches a worker),
  // so its shards are as the continue left them.
  uint64_t continued_epoch_ = 0;
  int64_t continued_step_ = -1;
  std::map<std::string, uint64_t> continued_serving_;
  int64_t hold_after_continue_ = -1;
  // A planned move waiting for the trainers to reach a step boundary.
  bool pausing_ = false;
  // The hold is the one a pause became (its end makes the moves).
  bool hold_moves_ = false;
  int64_t pause_step_ = 0;  // RoutingTable.pause_step.
  std::string pause_cause_;
  Clock::time_point pause_began_;
  // While pausing: each shard's home as the move was planned when the
  // pause began or was joined ("": none planned); the pause tables name
  // the new ones (RoutingEntry.moving_to). PlaceAtBoundary plans again.
  std::vector<std::string> planned_home_;
  // This epoch's live moves: each shard's old home ("": not moved).
  std::vector<std::string> moved_from_;
  // CopyHosts(), and when and at which version() it was ranked.
  std::vector<std::string> copy_hosts_;
  Clock::time_point copy_hosts_at_;
  uint64_t copy_hosts_version_ = 0;
  // The newest epoch that moved shards live, and the newest one whose new
  // homes all serve them (HeartbeatAck.moves_done_epoch).
  uint64_t move_epoch_ = 0;
  uint64_t moves_done_epoch_ = 0;
  // When Tick next looks for moves still to make.
  Clock::time_point next_move_check_;
  // When the newest live move began (its epoch: move_epoch_).
  Clock::time_point move_began_;
  // After a restart, until the trainers have reported: a pause waits for
  // them rather than taking none as training.
  Clock::time_point trainers_unknown_until_;
  // (step, shard) copies of committed checkpoints queued off draining
  // workers, and when (CopyCommittedOffDrains: queued again when not
  // reported within cluster.move_timeout_ms).
  std::map<std::pair<int64_t, size_t>, Clock::time_point> copied_off_;
  // Replication tasks by target worker, handed out with its next heartbeat.
  std::map<std::string, std::vector<control::ReplicationTask>> tasks_;
  CheckpointLedger ledger_;
};

}  // namespace switchyard::coordinator

#endif  // SWITCHYARD_COORDINATOR_CLUSTER_STATE_H_
