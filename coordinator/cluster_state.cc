#include "coordinator/cluster_state.h"

#include <google/protobuf/util/message_differencer.h>

#include <algorithm>
#include <iomanip>
#include <random>
#include <set>
#include <sstream>

#include "common/metrics.h"
#include "common/shard_ref.h"
#include "coordinator/placement.h"

namespace switchyard::coordinator {

using control::MemberKind;
using control::MemberState;

namespace {

int64_t UnixMsNow() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int64_t MsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(b - a).count();
}

std::string KindName(MemberKind kind) {
  return kind == control::WORKER ? "worker" : "trainer";
}

std::vector<ShardId> ShardIds(const std::vector<ShardFootprint>& shards) {
  std::vector<ShardId> ids;
  ids.reserve(shards.size());
  for (const auto& s : shards) ids.push_back(s.id);
  return ids;
}

}  // namespace

ClusterState::ClusterState(const config::SwitchyardConfig& config)
    : config_(config),
      shards_(ModelShards(config)),
      ledger_(ShardIds(shards_), config.checkpoint().keep_last()) {
  shard_home_.assign(shards_.size(), "");
  shard_unplaced_.assign(shards_.size(), true);
  moved_from_.assign(shards_.size(), "");
  NewRunId();
}

void ClusterState::NewRunId() {
  std::random_device device;
  std::ostringstream id;
  id << std::hex;
  for (int i = 0; i < 4; ++i)
    id << std::setw(8) << std::setfill('0') << device();
  run_id_ = id.str();
  ++version_;
}

StatusOr<ClusterState> ClusterState::Restore(
    const config::SwitchyardConfig& config,
    const control::CoordinatorSnapshot& snapshot, Clock::time_point now) {
  using google::protobuf::util::MessageDifferencer;
  if (!MessageDifferencer::Equals(config.model(), snapshot.config().model()) ||
      config.training().optimizer() !=
          snapshot.config().training().optimizer()) {
    return FailedPreconditionError(
        "the state directory holds a run with a different model or optimizer "
        "configuration; use the original config, or another "
        "cluster.state_dir for a new run");
  }
  ClusterState state(config);
  if (snapshot.shard_home_size() != static_cast<int>(state.shards_.size()) ||
      snapshot.shard_unplaced_size() != snapshot.shard_home_size()) {
    return DataLossError("coordinator snapshot holds " +
                         std::to_string(snapshot.shard_home_size()) +
                         " shard homes, the model has " +
                         std::to_string(state.shards_.size()));
  }
  // The same epoch: the routing table the members hold is still the one
  // in force, and training goes on through a coordinator restart. What
  // changed while it was away (a member died or came back) fences and
  // advances the epoch as usual once found out.
  state.epoch_ = snapshot.epoch();
  state.next_incarnation_ = snapshot.next_incarnation();
  if (!snapshot.run_id().empty()) state.run_id_ = snapshot.run_id();
  state.placed_ = snapshot.placed();
  state.placement_error_ = snapshot.placement_error();
  state.ledger_.Restore(snapshot);
  state.recoveries_.assign(snapshot.recoveries().begin(),
                           snapshot.recoveries().end());
  state.recoveries_total_ = snapshot.recoveries_total();
  state.holding_ = snapshot.holding();
  state.hold_cause_ = snapshot.hold_cause();
  state.hold_moves_ = snapshot.hold_moves();
  state.continues_ = snapshot.continues();
  if (state.continues_) state.ledger_.ContinueAt(snapshot.continue_step());
  for (int i = 0; i < snapshot.moved_from_size() &&
                  i < static_cast<int>(state.moved_from_.size());
       ++i) {
    state.moved_from_[i] = snapshot.moved_from(i);
  }
  for (int i = 0; i < snapshot.shard_home_size(); ++i) {
    state.shard_home_[i] = snapshot.shard_home(i);
    state.shard_unplaced_[i] = snapshot.shard_unplaced(i);
  }
  // In 64 bits: lease_ms may be up to INT32_MAX.
  const auto grace =
      std::chrono::milliseconds(2 * int64_t{config.cluster().lease_ms()});
  // Until the trainers have said where they are, no move is planned.
  state.trainers_unknown_until_ = now + grace;
  for (const auto& record : snapshot.members()) {
    Member m;
    m.record = record;
    if (record.state() == control::ALIVE ||
        record.state() == control::UNCONFIRMED) {
      m.record.set_state(control::UNCONFIRMED);
    }
    m.lease_deadline = now + grace;
    m.last_heartbeat = now;
    // Deaths as long ago as the wall clock says; those older than the
    // crash-loop window count for nothing and are dropped from the record
    // too (the two lists stay in step), which also keeps absurd stored
    // times out of the clock arithmetic. A time in the future is now.
    const int64_t unix_now = UnixMsNow();
    const int64_t oldest = unix_now - config.cluster().crash_loop_window_ms();
    auto* unix_ms = m.record.mutable_death_unix_ms();
    unix_ms->Clear();
    for (int64_t died : record.death_unix_ms()) {
      if (died < oldest) continue;
      died = std::min(died, unix_now);  // Kept as now, not again each restart.
      m.deaths.push_back(now - std::chrono::milliseconds(unix_now - died));
      unix_ms->Add(died);
    }
    state.members_.emplace(record.registration().name(), std::move(m));
  }
  ++state.version_;
  LOG(INFO) << "coordinator: resumed at epoch " << state.epoch_ << " with "
            << state.members_.size() << " known members";
  return state;
}

control::CoordinatorSnapshot ClusterState::Snapshot() const {
  control::CoordinatorSnapshot s;
  s.set_epoch(epoch_);
  s.set_next_incarnation(next_incarnation_);
  s.set_run_id(run_id_);
  for (const auto& [name, m] : members_) *s.add_members() = m.record;
  for (size_t i = 0; i < shards_.size(); ++i) {
    s.add_shard_home(shard_home_[i]);
    s.add_shard_unplaced(shard_unplaced_[i]);
  }
  s.set_placed(placed_);
  *s.mutable_config() = config_;
  s.set_placement_error(placement_error_);
  ledger_.SaveTo(&s);
  for (const auto& r : recoveries_) *s.add_recoveries() = r;
  s.set_recoveries_total(recoveries_total_);
  s.set_holding(holding_);
  s.set_hold_cause(hold_cause_);
  s.set_hold_moves(holding_ && hold_moves_);
  s.set_continues(continues_);
  s.set_continue_step(continues_ ? ledger_.resume_step() : 0);
  for (const std::string& m : moved_from_) s.add_moved_from(m);
  return s;
}

bool ClusterState::IsLive(const Member& m) const {
  return m.record.state() == control::ALIVE ||
         m.record.state() == control::UNCONFIRMED;
}

const std::vector<std::string>& ClusterState::CopyHosts(Clock::time_point now) {
  // Ranked again once a heartbeat period old, or at once when membership
  // changed (a death, a drain, a join: every such change is a version).
  if (!copy_hosts_.empty() && copy_hosts_version_ == version() &&
      now - copy_hosts_at_ <
          std::chrono::milliseconds(config_.cluster().heartbeat_ms())) {
    return copy_hosts_;
  }
  std::vector<std::pair<uint64_t, std::string>> ranked;
  for (const auto& [name, m] : members_) {
    if (m.record.registration().kind() != control::WORKER ||
        m.record.state() != control::ALIVE || m.record.draining() ||
        m.on_probation) {
      continue;
    }
    uint64_t tokens = 0;
    for (const auto& [shard, n] : m.tokens) tokens += n;
    ranked.emplace_back(tokens, name);
  }
  std::sort(ranked.begin(), ranked.end());
  copy_hosts_.clear();
  for (auto& [tokens, name] : ranked) copy_hosts_.push_back(std::move(name));
  copy_hosts_at_ = now;
  copy_hosts_version_ = version();
  return copy_hosts_;
}

int ClusterState::NumLiveWorkers() const {
  int n = 0;
  for (const auto& [name, m] : members_) {
    if (m.record.registration().kind() == control::WORKER && IsLive(m) &&
        !m.record.draining()) {
      ++n;
    }
  }
  return n;
}

bool ClusterState::TrainersUnknown(Clock::time_point now) const {
  if (now >= trainers_unknown_until_) return false;
  for (const auto& [name, m] : members_) {
    if (m.record.registration().kind() == control::TRAINER && IsLive(m) &&
        !m.reported) {
      return true;
    }
  }
  return false;
}

bool ClusterState::BumpEpoch(const std::string& why, bool place_moves) {
  // A move planned, pausing or held for: made with this rollback.
  const bool moves_due = pausing_ || (holding_ && hold_moves_);
  ++epoch_;
  epoch_cause_ = why;
  ++version_;
  ++routing_version_;
  holding_ = false;
  held_.clear();
  continues_ = false;
  pausing_ = false;
  moved_from_.assign(shards_.size(), "");
  // Nothing handed over is needed any more: the shards restore from the
  // checkpoint.
  moves_done_epoch_ = move_epoch_;
  if (!placed_) {
    LOG(INFO) << "coordinator: epoch " << epoch_ << ": " << why;
    return false;
  }
  // Every new epoch of a placed cluster names the step all its members
  // continue from: the newest committed checkpoint (DESIGN.md, "Failures
  // and elasticity"). The step in flight is abandoned; members that trained
  // past the checkpoint roll back to it.
  ledger_.RollBack();
  RecordRecovery(why, ledger_.resume_step(), /*rolled_back=*/true);
  LOG(WARNING) << "coordinator: epoch " << epoch_ << ": " << why
               << "; the cluster continues from step " << ledger_.resume_step()
               << (ledger_.resume_step() > 0
                       ? " (the newest committed checkpoint)"
                       : " (nothing committed yet)");
  // The moves the pause (or the hold it became) was for are made with the
  // rollback.
  if (moves_due && place_moves) PlaceWithRollback();
  return moves_due;
}

void ClusterState::PlaceWithRollback() {
  const PlacementInput input = CurrentPlacementInput();
  if (AdoptPlacement(input, ComputePlacement(input))) {
    LOG(WARNING) << "coordinator: epoch " << epoch_
                 << " places the shards anew (restored from the newest "
                    "committed checkpoint)";
  }
}

bool ClusterState::MovesAny(const PlacementInput& input,
                            const PlacementResult& result) const {
  if (result.num_unplaced > 0) return false;
  for (size_t i = 0; i < shards_.size(); ++i) {
    if (input.workers[result.worker_of_shard[i]].name != shard_home_[i]) {
      return true;
    }
  }
  return false;
}

void ClusterState::RecordRecovery(const std::string& why, int64_t resume_step,
                                  bool rolled_back, int64_t began_unix_ms) {
  control::Recovery recovery;
  recovery.set_epoch(epoch_);
  recovery.set_unix_ms(began_unix_ms > 0 ? began_unix_ms : UnixMsNow());
  recovery.set_cause(why);
  recovery.set_resume_step(resume_step);
  recovery.set_rolled_back(rolled_back);
  int64_t at = -1;
  for (const auto& [name, m] : members_) {
    if (m.record.registration().kind() == control::TRAINER) {
      at = std::max(at, m.step);
    }
  }
  recovery.set_at_step(std::max<int64_t>(at, 0));
  recoveries_.push_back(std::move(recovery));
  if (recoveries_.size() > kMaxRecoveries)
    recoveries_.erase(recoveries_.begin());
  ++recoveries_total_;
  MetricsRegistry::Global()
      .GetCounter("switchyard_coordinator_recoveries_total")
      ->Increment();
}

void ClusterState::FinishRecoveries() {
  if (recoveries_.empty() || recoveries_.back().duration_ms() > 0) return;
  // The oldest epoch a live trainer trains under.
  uint64_t oldest = 0;
  bool any = false;
  for (const auto& [name, m] : members_) {
    if (m.record.registration().kind() != control::TRAINER || !IsLive(m)) {
      continue;
    }
    oldest = any ? std::min(oldest, m.training_epoch) : m.training_epoch;
    any = true;
  }
  if (!any || oldest == 0) return;
  const int64_t now = UnixMsNow();
  for (auto& r : recoveries_) {
    if (r.duration_ms() > 0 || r.epoch() > oldest) continue;
    r.set_duration_ms(std::max<int64_t>(1, now - r.unix_ms()));
    MetricsRegistry::Global()
        .GetHistogram("switchyard_coordinator_recovery_ms", LatencyBucketsMs())
        ->Observe(static_cast<double>(r.duration_ms()));
    ++version_;
  }
}

void ClusterState::Hold(const std::string& why) {
  if (holding_) {
    LOG(WARNING) << "coordinator: " << why << " (within the hold of epoch "
                 << epoch_ << ")";
    ++version_;
    return;
  }
  hold_after_continue_ =
      continues_ && epoch_ == continued_epoch_ ? continued_step_ : -1;
  ++epoch_;
  ++version_;
  ++routing_version_;
  holding_ = true;
  hold_moves_ = pausing_;
  hold_cause_ = why;
  epoch_cause_ = why;
  hold_began_unix_ms_ = UnixMsNow();
  held_.clear();
  continues_ = false;
  // A pending move is made at this hold's end (PlaceAtBoundary).
  pausing_ = false;
  moved_from_.assign(shards_.size(), "");
  LOG(WARNING) << "coordinator: epoch " << epoch_ << ": " << why
               << "; holding the cluster until every worker reports the step "
                  "it stopped at";
}

void ClusterState::MaybeEndHold(Clock::time_point now) {
  if (!holding_) return;
  std::set<std::string> holders;
  for (size_t i = 0; i < shards_.size(); ++i) {
    if (!shard_unplaced_[i] && !shard_home_[i].empty()) {
      holders.insert(shard_home_[i]);
    }
  }
  int64_t reached = 0;
  for (const std::string& name : holders) {
    auto it = held_.find(name);
    if (it == held_.end()) return;  // Not yet.
    reached = std::max(reached, it->second.first);
  }
  // Every worker is at `reached` or one update behind it (a trainer died
  // between its StepDones: some workers applied the step, the others hold
  // all its gradients), and was serving its shards.
  std::string why;
  // The workers whose shards are intact at their step (by incarnation):
  // the next hold's shortcut.
  std::map<std::string, uint64_t> intact;
  for (const std::string& name : holders) {
    const auto [step, serving] = held_.at(name);
    // A worker that skipped the continuing epoch this hold began in.
    const auto c = continued_serving_.find(name);
    const auto m = members_.find(name);
    const bool skipped_continue =
        hold_after_continue_ >= 0 && step == hold_after_continue_ &&
        step == reached && c != continued_serving_.end() &&
        m != members_.end() && c->second == m->second.record.incarnation();
    if ((serving || skipped_continue) && m != members_.end()) {
      intact[name] = m->second.record.incarnation();
    }
    if (!serving && !skipped_continue) {
      why = name + " was not serving its shards";
    } else if (step < reached - 1) {
      why = name + " held at step " + std::to_string(step) + ", others at " +
            std::to_string(reached);
    }
    if (!why.empty()) break;
  }
  if (!why.empty()) {
    // The moves the hold was for, if any, are made with the rollback.
    if (!BumpEpoch(hold_cause_ + "; the hold cannot continue (" + why + ")")) {
      PlaceWithRollback();
    }
    return;
  }
  ++epoch_;
  ++version_;
  ++routing_version_;
  holding_ = false;
  held_.clear();
  continues_ = true;
  epoch_cause_ = hold_cause_ + "; continuing";
  ledger_.ContinueAt(reached);
  PlaceAtBoundary(now);
  continued_epoch_ = epoch_;
  continued_step_ = reached;
  continued_serving_ = std::move(intact);
  for (const std::string& from : moved_from_) {
    if (!from.empty()) continued_step_ = -1;  // Shards moved: no shortcut.
  }
  RecordRecovery(hold_cause_, reached, /*rolled_back=*/false,
                 hold_began_unix_ms_);
  LOG(WARNING) << "coordinator: epoch " << epoch_ << ": " << hold_cause_
               << "; the cluster continues from step " << reached
               << " (the step its workers reached: nothing rolls back)";
}

PlacementInput ClusterState::CurrentPlacementInput() const {
  PlacementInput input;
  input.shards = shards_;
  for (const auto& [name, m] : members_) {  // std::map: sorted by name.
    if (m.record.registration().kind() == control::WORKER && IsLive(m) &&
        !m.on_probation && !m.record.draining()) {
      input.workers.push_back({name, m.record.registration().capacity_bytes()});
      for (const auto& [shard, tokens] : m.tokens) {
        auto id = ShardId::Parse(shard);
        if (id.ok()) input.token_load[*id] += tokens;
      }
    }
  }
  for (size_t i = 0; i < shards_.size(); ++i) {
    if (!shard_home_[i].empty()) input.previous[shards_[i].id] = shard_home_[i];
  }
  return input;
}

bool ClusterState::AllShardsOnLiveWorkers() const {
  for (size_t i = 0; i < shards_.size(); ++i) {
    if (shard_unplaced_[i]) return false;
    auto it = members_.find(shard_home_[i]);
    if (it == members_.end() || !IsLive(it->second) ||
        it->second.on_probation) {
      return false;
    }
  }
  return true;
}

int ClusterState::ShardsHeldBy(const std::string& name) const {
  if (!placed_) return 0;
  int n = 0;
  for (size_t i = 0; i < shards_.size(); ++i) {
    n += !shard_unplaced_[i] && shard_home_[i] == name;
  }
  return n;
}

void ClusterState::Replace(const std::string& why, bool live,
                           Clock::time_point now) {
  if (!placed_ && NumLiveWorkers() < config_.cluster().workers()) return;
  const PlacementInput input = CurrentPlacementInput();
  const PlacementResult result = ComputePlacement(input);
  if (live && placed_ && AllShardsOnLiveWorkers() && result.num_unplaced == 0) {
    // Nothing was lost: the shards move at the next step boundary, live.
    if (!MovesAny(input, result)) {
      // Nobody acts on a spare's coming or going: no table goes out (a
      // new member gets one in its registration's answer).
      ++version_;
      LOG(INFO) << "coordinator: " << why << ": no shard moves (epoch "
                << epoch_ << " stands)";
      return;
    }
    if (holding_) {
      LOG(INFO) << "coordinator: " << why
                << ": the shards move when the hold of epoch " << epoch_
                << " ends";
      hold_moves_ = true;  // Or with a rollback that ends it.
      ++version_;
      return;
    }
    StartPause(why, now);
    return;
  }
  if (result.num_unplaced > 0 && CallOffDrains(result.status.message())) {
    Replace(why, live, now);  // Placed again with them.
    return;
  }
  const bool first = !placed_;
  if (!AdoptPlacement(input, result) && !first) {
    // No shard moved (a spare joined or died, a worker on probation came
    // back): the epoch stands, nothing rolls back, and no table goes out
    // (nobody acts on a spare; a new member gets one in its registration's
    // answer).
    ++version_;
    LOG(INFO) << "coordinator: " << why << ": no shard moves (epoch " << epoch_
              << " stands)";
    return;
  }
  BumpEpoch(why + (first ? ": first placement of " : ": re-placement moved ") +
            std::to_string(first ? shards_.size() : result.num_moved) +
            " shards over " + std::to_string(input.workers.size()) +
            " workers");
  placed_ = true;  // After: the first placement is no rollback.
}

bool ClusterState::AdoptPlacement(const PlacementInput& input,
                                  const PlacementResult& result) {
  const std::vector<std::string> old_home = shard_home_;
  const std::vector<bool> old_unplaced = shard_unplaced_;
  for (size_t i = 0; i < shards_.size(); ++i) {
    const int w = result.worker_of_shard[i];
    shard_unplaced_[i] = w < 0;
    if (w >= 0) shard_home_[i] = input.workers[w].name;
  }
  placement_error_ = result.status.ok() ? "" : result.status.message();
  if (!result.status.ok()) {
    LOG(ERROR) << "coordinator: " << result.status.ToString();
  }
  return shard_home_ != old_home || shard_unplaced_ != old_unplaced;
}

void ClusterState::StartPause(const std::string& why, Clock::time_point now) {
  if (pausing_) {
    LOG(INFO) << "coordinator: " << why
              << " (joins the move planned: " << pause_cause_ << ")";
    pause_cause_ += "; " + why;
    PlanPausedMoves();
    ++version_;
    ++routing_version_;
    return;
  }
  pausing_ = true;
  pause_step_ = 0;
  pause_cause_ = why;
  pause_began_ = now;
  PlanPausedMoves();
  ++version_;
  ++routing_version_;
  LOG(INFO) << "coordinator: " << why
            << ": shards move live at the next step boundary (epoch " << epoch_
            << " pauses the trainers there)";
  MaybeEndPause(now);
}

void ClusterState::PlanPausedMoves() {
  planned_home_.assign(shards_.size(), "");
  for (size_t i = 0; i < shards_.size(); ++i) {
    if (shard_unplaced_[i]) return;  // As PlaceAtBoundary: no live move.
  }
  const PlacementInput input = CurrentPlacementInput();
  const PlacementResult result = ComputePlacement(input);
  if (result.num_unplaced > 0) return;
  for (size_t i = 0; i < shards_.size(); ++i) {
    planned_home_[i] = input.workers[result.worker_of_shard[i]].name;
  }
}

void ClusterState::MaybeEndPause(Clock::time_point now) {
  if (!pausing_) return;
  int training = 0;
  bool all_paused = true, paused_any = false;
  int64_t lo = 0, hi = 0;
  for (const auto& [name, m] : members_) {
    if (m.record.registration().kind() != control::TRAINER || !IsLive(m) ||
        m.training_epoch != epoch_) {
      continue;
    }
    // Where it stops: where it says it did, else the boundary after the
    // step it last began.
    const int64_t at = m.paused ? m.paused_step : m.step + 1;
    all_paused &= m.paused;
    if (m.paused) lo = paused_any ? std::min(lo, at) : at;
    paused_any |= m.paused;
    hi = training == 0 ? at : std::max(hi, at);
    ++training;
  }
  if (training == 0 && TrainersUnknown(now)) {
    return;  // Restarted: the trainers have not said where they are yet.
  }
  if (training > 0 && (!all_paused || lo != hi)) {
    // One trainer had begun a later step before it heard of the pause:
    // the others go on to that boundary.
    if (paused_any && lo < hi && pause_step_ < hi) {
      pause_step_ = hi;
      ++version_;
      ++routing_version_;
      LOG(INFO) << "coordinator: trainers stopped at steps " << lo
                << " and beyond; the pause moves to the boundary of step "
                << hi;
    }
    return;
  }
  const std::string why =
      pause_cause_ + (training > 0 ? " (the trainers stopped before step " +
                                         std::to_string(hi) + ")"
                                   : " (no trainer is training)");
  Hold(why);
}

void ClusterState::PlaceAtBoundary(Clock::time_point now) {
  moved_from_.assign(shards_.size(), "");
  for (size_t i = 0; i < shards_.size(); ++i) {
    // An orphan has no state to hand over: the failure's recovery places it.
    if (shard_unplaced_[i]) return;
  }
  const PlacementInput input = CurrentPlacementInput();
  const PlacementResult result = ComputePlacement(input);
  if (result.num_unplaced > 0) {
    CallOffDrains(result.status.message());
    return;
  }
  int moved = 0;
  std::set<std::string> to;
  for (size_t i = 0; i < shards_.size(); ++i) {
    const std::string& home = input.workers[result.worker_of_shard[i]].name;
    if (home == shard_home_[i]) continue;
    moved_from_[i] = shard_home_[i];
    shard_home_[i] = home;
    to.insert(home);
    ++moved;
  }
  if (moved == 0) return;
  move_epoch_ = epoch_;
  move_began_ = now;
  std::string names;
  for (const std::string& n : to) names += (names.empty() ? "" : ", ") + n;
  LOG(WARNING) << "coordinator: epoch " << epoch_ << " moves " << moved
               << " shards live (to " << names << ")";
  MetricsRegistry::Global()
      .GetCounter("switchyard_coordinator_shards_moved_live_total")
      ->Increment(static_cast<uint64_t>(moved));
}

bool ClusterState::CallOffDrains(const std::string& why) {
  bool any = false;
  for (auto& [name, m] : members_) {
    if (!IsLive(m) || !m.record.draining()) continue;
    m.record.set_draining(false);
    any = true;
    LOG(ERROR) << "coordinator: the drain of " << name
               << " is called off: " << why << "; it keeps serving its shards";
  }
  if (any) ++version_;
  return any;
}

void ClusterState::CopyCommittedOffDrains(Clock::time_point now) {
  if (!placed_) return;
  bool draining = false;
  for (const auto& [name, m] : members_) {
    draining |= IsLive(m) && m.record.draining();
  }
  if (!draining) return;  // Every tick: nothing to look at, usually.
  // Every kept committed checkpoint: the newest for a rollback, the older
  // ones for `--from-step` and `ckpt export`. Newest first. A copy not
  // reported within cluster.move_timeout_ms (failed, or its target gone)
  // is queued again; copies of checkpoints no longer kept are forgotten.
  const auto& committed = ledger_.committed();
  const int64_t oldest = committed.empty() ? 0 : committed.front().step();
  const auto retry =
      std::chrono::milliseconds(config_.cluster().move_timeout_ms());
  for (auto it = copied_off_.begin(); it != copied_off_.end();) {
    it = it->first.first < oldest || now - it->second > retry
             ? copied_off_.erase(it)
             : std::next(it);
  }
  for (auto c = committed.rbegin(); c != committed.rend(); ++c) {
    if (c->holder_size() != static_cast<int>(shards_.size())) continue;
    // By (holder, new home): the shards to copy.
    std::map<std::pair<std::string, std::string>, std::vector<size_t>> copies;
    for (size_t i = 0; i < shards_.size(); ++i) {
      const int index = static_cast<int>(i);
      const std::string& holder = c->holder(index);
      auto it = members_.find(holder);
      const bool replicated =
          index < c->replicas_size() && !c->replicas(index).empty();
      if (it == members_.end() || !IsLive(it->second) ||
          !it->second.record.draining() || shard_unplaced_[i] ||
          shard_home_[i] == holder || replicated ||
          !copied_off_.emplace(std::make_pair(c->step(), i), now).second) {
        continue;
      }
      copies[{holder, shard_home_[i]}].push_back(i);
    }
    for (const auto& [from_to, shards] : copies) {
      const auto& [from, to] = from_to;
      control::ReplicationTask task;
      task.set_step(c->step());
      task.set_source(from);
      task.set_source_address(
          members_.at(from).record.registration().data_address());
      for (size_t i : shards) *task.add_shards() = ToShardRef(shards_[i].id);
      tasks_[to].push_back(task);
      LOG(INFO) << "coordinator: " << to << " copies " << shards.size()
                << " shards of committed checkpoint " << c->step() << " from "
                << from << ", which is draining";
    }
  }
}

void ClusterState::MaybeFinishMoves() {
  if (!placed_ || holding_ || moves_done_epoch_ >= epoch_) return;
  for (size_t i = 0; i < shards_.size(); ++i) {
    if (shard_unplaced_[i]) return;
    auto it = members_.find(shard_home_[i]);
    if (it == members_.end() || it->second.open_epoch < epoch_) return;
  }
  moves_done_epoch_ = epoch_;
  ++version_;
  if (move_epoch_ == epoch_) {
    LOG(INFO) << "coordinator: the shards moved in epoch " << epoch_
              << " are in place";
  }
}

void ClusterState::RecordDeath(Member* member, Clock::time_point now) {
  if (member->record.registration().kind() != control::WORKER) return;
  const auto window =
      std::chrono::milliseconds(config_.cluster().crash_loop_window_ms());
  // In the record too, in wall-clock time: the same deaths in the same
  // order (the snapshot keeps the record; Restore builds `deaths` from it).
  auto& deaths = member->deaths;
  auto* unix_ms = member->record.mutable_death_unix_ms();
  deaths.push_back(now);
  unix_ms->Add(UnixMsNow());
  int kept = 0;
  for (int i = 0; i < static_cast<int>(deaths.size()); ++i) {
    if (now - deaths[i] > window) continue;
    deaths[kept] = deaths[i];
    unix_ms->Set(kept, unix_ms->Get(i));
    ++kept;
  }
  deaths.resize(kept);
  unix_ms->Truncate(kept);
}

void ClusterState::Fence(Member* member, MemberState state,
                         const std::string& why, Clock::time_point now) {
  member->record.set_state(state);
  // A drain ends with the process (a new one under the name serves).
  member->record.set_draining(false);
  if (state == control::DEAD) RecordDeath(member, now);
  const auto& reg = member->record.registration();
  const std::string what =
      KindName(reg.kind()) + " " + reg.name() + " (incarnation " +
      std::to_string(member->record.incarnation()) + ") " + why;
  LOG(WARNING) << "coordinator: " << what;
  if (reg.kind() == control::WORKER && placed_) {
    Replace(what);
  } else if (reg.kind() == control::WORKER) {
    BumpEpoch(what);
  } else if (placed_ && state == control::DEAD) {
    // A trainer's death stops the step in flight (its partial gradients
    // are on every worker): a hold, then the step is redone. One that left
    // has finished its work.
    Hold(what);
  } else {
    ++version_;
    MaybeEndPause(now);  // One trainer fewer to wait for.
  }
}

StatusOr<control::RegisterResponse> ClusterState::Register(
    const control::RegisterRequest& request, Clock::time_point now) {
  if (request.name().empty()) {
    return InvalidArgumentError("register: name must not be empty");
  }
  if (request.kind() != control::WORKER && request.kind() != control::TRAINER) {
    return InvalidArgumentError("register: kind must be WORKER or TRAINER");
  }
  if (request.kind() == control::WORKER && request.capacity_bytes() <= 0) {
    return InvalidArgumentError(
        "register: worker " + request.name() + " offers capacity_bytes " +
        std::to_string(request.capacity_bytes()) + "; it must be > 0");
  }
  if (request.kind() == control::TRAINER) {
    if (request.rank() < 0 || request.rank() >= config_.cluster().trainers()) {
      return InvalidArgumentError(
          "register: trainer rank " + std::to_string(request.rank()) +
          " is outside [0, cluster.trainers = " +
          std::to_string(config_.cluster().trainers()) + ")");
    }
    for (const auto& [name, m] : members_) {
      if (name != request.name() && IsLive(m) &&
          m.record.registration().kind() == control::TRAINER &&
          m.record.registration().rank() == request.rank()) {
        return AlreadyExistsError("register: rank " +
                                  std::to_string(request.rank()) +
                                  " is already held by live trainer " + name);
      }
    }
  }
  if (request.run_id() == run_id_ &&
      request.committed_step_seen() > ledger_.latest_committed_step()) {
    return DataLossError(
        "this coordinator's state is older than its members know: " +
        request.name() + " was told of committed checkpoint " +
        std::to_string(request.committed_step_seen()) + " in run " + run_id_ +
        ", the newest commit here is " +
        std::to_string(ledger_.latest_committed_step()) +
        ". The coordinator's state directory was damaged or restored from an "
        "old copy; the coordinator stops rather than resume from older "
        "checkpoints its members may have dropped. Restore the state, or "
        "start again with --fresh");
  }
  auto it = members_.find(request.name());
  if (it != members_.end() &&
      it->second.record.registration().kind() != request.kind()) {
    return AlreadyExistsError(
        "register: name " + request.name() + " belongs to a " +
        KindName(it->second.record.registration().kind()));
  }
  const auto lease = std::chrono::milliseconds(config_.cluster().lease_ms());
  bool confirmed = false;
  bool place_moves = false;  // A rollback below left moves to make.
  if (it != members_.end() && IsLive(it->second) &&
      request.previous_incarnation() != 0 &&
      request.previous_incarnation() == it->second.record.incarnation()) {
    confirmed = true;  // Same process, reconnected (e.g. coordinator restart).
  }
  if (it == members_.end()) {
    it = members_.emplace(request.name(), Member()).first;
  } else if (!confirmed && IsLive(it->second)) {
    // A new process under a live name: the old incarnation is fenced (a
    // worker's shards, or a trainer's step in flight, are lost with it).
    it->second.record.set_state(control::DEAD);
    RecordDeath(&it->second, now);
    const std::string why = request.name() + " re-registered; incarnation " +
                            std::to_string(it->second.record.incarnation()) +
                            " fenced";
    if (request.kind() == control::WORKER) {
      // Moves due are placed once the new incarnation counts (below), so
      // that the worker keeps its shards rather than lose them and join.
      place_moves = BumpEpoch(why, /*place_moves=*/false);
    } else if (placed_) {
      Hold(why);
    }
  } else if (!confirmed && placed_ && request.kind() == control::TRAINER &&
             it->second.record.state() == control::DEAD) {
    // A trainer that died comes back: the others may have given up on the
    // step waiting for it; all of them start it again together.
    Hold(request.name() + " came back after dying");
  }
  Member& m = it->second;
  *m.record.mutable_registration() = request;
  m.record.mutable_registration()->clear_previous_incarnation();
  if (!confirmed) m.record.set_incarnation(next_incarnation_++);
  m.record.set_state(control::ALIVE);
  m.lease_deadline = now + lease;
  m.last_heartbeat = now;
  ++version_;
  // Members act on a shard holder's address (and incarnation) only: a
  // trainer's or a spare's registration sends no table to anyone (2,048
  // registrations would otherwise send 2 million).
  if (request.kind() == control::WORKER && ShardsHeldBy(request.name()) > 0) {
    ++routing_version_;
  }
  LOG(INFO) << "coordinator: " << KindName(request.kind()) << " "
            << request.name() << (confirmed ? " reconfirmed" : " registered")
            << " (incarnation " << m.record.incarnation() << ", pid "
            << request.pid() << " on " << request.host() << ")";
  if (!confirmed) {
    m.on_probation = false;
    m.training_epoch = 0;
    m.record.set_draining(false);
  }
  if (request.kind() == control::WORKER && !confirmed &&
      config_.cluster().probation_ms() > 0 &&
      static_cast<int>(m.deaths.size()) >=
          config_.cluster().crash_loop_deaths()) {
    // A crash loop: shards given to it would be lost again.
    m.on_probation = true;
    m.probation_until =
        now + std::chrono::milliseconds(config_.cluster().probation_ms());
    LOG(WARNING) << "coordinator: worker " << request.name()
                 << " is in a crash loop (" << m.deaths.size()
                 << " deaths within cluster.crash_loop_window_ms = "
                 << config_.cluster().crash_loop_window_ms()
                 << "): it gets no shards until it has stayed up "
                 << config_.cluster().probation_ms()
                 << " ms (cluster.probation_ms)";
  }
  // The moves a rollback above left to make, with this incarnation as it
  // now stands (not on probation, not draining: or left out).
  if (place_moves) PlaceWithRollback();
  if (request.kind() == control::WORKER && !confirmed) {
    // A joiner (or a restarted worker that may have lost its shards while
    // dead) changes the placement once placement has begun.
    bool holds_any = false;
    for (size_t i = 0; i < shards_.size(); ++i) {
      holds_any |= shard_home_[i] == request.name() && !shard_unplaced_[i];
    }
    if (!placed_ || !holds_any || m.on_probation) {
      Replace(request.name() + " joined", /*live=*/true, now);
    }
  }
  control::RegisterResponse response;
  response.set_incarnation(m.record.incarnation());
  response.set_run_id(run_id_);
  *response.mutable_config() = config_;
  *response.mutable_routing() = Routing();
  return response;
}

StatusOr<control::HeartbeatAck> ClusterState::Heartbeat(
    const control::Heartbeat& beat, Clock::time_point now) {
  auto it = members_.find(beat.name());
  if (it == members_.end() || !IsLive(it->second) ||
      it->second.record.incarnation() != beat.incarnation()) {
    return FailedPreconditionError(
        "fenced: incarnation " + std::to_string(beat.incarnation()) + " of " +
        beat.name() + " is not current (epoch " + std::to_string(epoch_) +
        "); register again");
  }
  Member& m = it->second;
  if (m.record.state() == control::UNCONFIRMED) {
    m.record.set_state(control::ALIVE);
    ++version_;
    // A shard holder's address is confirmed: tell the members.
    if (ShardsHeldBy(beat.name()) > 0) ++routing_version_;
  }
  m.lease_deadline =
      now + std::chrono::milliseconds(config_.cluster().lease_ms());
  m.last_heartbeat = now;
  // A worker reports every shard it hosts (none: it hosts none), so its
  // counts replace the last heartbeat's whole.
  if (m.record.registration().kind() == control::WORKER) {
    m.tokens.clear();
    m.replicated.clear();
    m.copy_tokens = beat.copy_tokens();
    m.offloaded_tokens = beat.offloaded_tokens();
    m.copy_bytes = beat.copy_bytes();
  }
  for (const auto& load : beat.loads()) {
    m.tokens[FromShardRef(load.shard()).ToString()] = load.tokens();
    if (load.replicas() > 1) m.replicated.push_back(load);
  }
  if (m.record.registration().kind() == control::TRAINER) {
    m.training_epoch = beat.training_epoch();
    m.step = beat.step();
    m.paused = beat.paused();
    m.paused_step = beat.paused_step();
    m.reported = true;
    FinishRecoveries();
    MaybeEndPause(now);
  } else if (beat.open_epoch() > m.open_epoch) {
    m.open_epoch = beat.open_epoch();
    MaybeFinishMoves();
  }
  if (holding_ && beat.held_epoch() == epoch_ &&
      m.record.registration().kind() == control::WORKER &&
      !held_.count(beat.name())) {
    held_[beat.name()] = {beat.held_step(), beat.held_serving()};
    MaybeEndHold(now);
  }
  control::HeartbeatAck ack;
  ack.set_epoch(epoch_);
  ack.set_run_id(run_id_);
  ack.set_committed_step(ledger_.latest_committed_step());
  ack.set_keep_from_step(ledger_.keep_from_step());
  ack.set_moves_done_epoch(moves_done_epoch_);
  // Drained: it holds nothing, what it handed over is in place, and no
  // rollback would need its store (its committed copies are replicated on
  // the shards' new homes: CopyCommittedOffDrains).
  ack.set_drained(m.record.draining() && placed_ && !pausing_ && !holding_ &&
                  ShardsHeldBy(beat.name()) == 0 &&
                  moves_done_epoch_ == epoch_ &&
                  !ledger_.OnlyCopiesOn(beat.name()));
  if (!m.replicated.empty() && config_.replication().enabled()) {
    for (const std::string& host : CopyHosts(now)) ack.add_copy_hosts(host);
  }
  auto tasks = tasks_.find(beat.name());
  if (tasks != tasks_.end()) {
    for (auto& t : tasks->second) {
      t.set_epoch(epoch_);  // The epoch the copy is made under.
      *ack.add_replicate() = std::move(t);
    }
    tasks_.erase(tasks);
  }
  return ack;
}

StatusOr<control::PeerLostAck> ClusterState::PeerLost(
    const control::PeerLost& report, Clock::time_point now) {
  auto reporter = members_.find(report.reporter());
  if (reporter == members_.end() || !IsLive(reporter->second) ||
      reporter->second.record.incarnation() != report.incarnation()) {
    return FailedPreconditionError(
        "fenced: incarnation " + std::to_string(report.incarnation()) + " of " +
        report.reporter() + " is not current; register again");
  }
  control::PeerLostAck ack;
  auto it = members_.find(report.peer());
  if (it == members_.end() || !IsLive(it->second) ||
      it->second.record.registration().kind() != control::WORKER ||
      it->second.record.incarnation() != report.peer_incarnation()) {
    return ack;  // Already fenced, or another incarnation by now.
  }
  Fence(&it->second, control::DEAD,
        "unreachable from " + report.reporter() + " (" + report.error() + ")",
        now);
  ack.set_fenced(true);
  return ack;
}

size_t ClusterState::ReplicasWanted() const {
  const int live = NumLiveWorkers();
  return static_cast<size_t>(
      std::max(0, std::min(config_.checkpoint().replicas(), live - 1)));
}

void ClusterState::AssignReplicas(const control::CheckpointReport& report) {
  const size_t want = ReplicasWanted();
  if (want == 0 || report.shards_size() == 0) return;
  const Member& source = members_.at(report.name());
  const std::string& host = source.record.registration().host();
  // Live workers after the source in name order (a fixed rotation), those
  // on other hosts first.
  std::vector<std::string> others, same_host;
  std::vector<std::string> names;
  for (const auto& [name, m] : members_) {
    if (m.record.registration().kind() == control::WORKER && IsLive(m) &&
        !m.record.draining() && name != report.name()) {
      names.push_back(name);
    }
  }
  std::stable_partition(names.begin(), names.end(), [&](const std::string& n) {
    return n > report.name();
  });
  for (const std::string& n : names) {
    (members_.at(n).record.registration().host() != host ? others : same_host)
        .push_back(n);
  }
  others.insert(others.end(), same_host.begin(), same_host.end());
  control::ReplicationTask task;
  task.set_step(report.step());
  task.set_source(report.name());
  task.set_source_address(source.record.registration().data_address());
  for (const auto& s : report.shards()) *task.add_shards() = s.shard();
  for (size_t i = 0; i < want && i < others.size(); ++i) {
    tasks_[others[i]].push_back(task);
  }
}

StatusOr<control::CheckpointReportAck> ClusterState::ReportCheckpoint(
    const control::CheckpointReport& report) {
  auto it = members_.find(report.name());
  if (it == members_.end() || !IsLive(it->second) ||
      it->second.record.incarnation() != report.incarnation() ||
      it->second.record.registration().kind() != control::WORKER) {
    return FailedPreconditionError(
        "checkpoint report from " + report.name() + " incarnation " +
        std::to_string(report.incarnation()) + ", not a current worker");
  }
  ASSIGN_OR_RETURN(const CheckpointLedger::Outcome outcome,
                   ledger_.Record(report, ReplicasWanted()));
  if (outcome.recorded && !report.replica()) AssignReplicas(report);
  control::CheckpointReportAck ack;
  ack.set_committed_step(outcome.committed_step);
  ack.set_newest_committed_step(ledger_.latest_committed_step());
  return ack;
}

Status ClusterState::Leave(const control::Leave& leave) {
  auto it = members_.find(leave.name());
  if (it == members_.end() || !IsLive(it->second) ||
      it->second.record.incarnation() != leave.incarnation()) {
    return FailedPreconditionError("leave: " + leave.name() + " incarnation " +
                                   std::to_string(leave.incarnation()) +
                                   " is not current");
  }
  Fence(&it->second, control::LEFT, "left the cluster", Clock::time_point());
  return OkStatus();
}

void ClusterState::Tick(Clock::time_point now) {
  for (auto& [name, m] : members_) {
    if (IsLive(m) && now > m.lease_deadline) {
      Fence(&m, control::DEAD,
            "lease expired (" +
                std::to_string(MsBetween(m.last_heartbeat, now)) +
                " ms since its last heartbeat)",
            now);
    }
  }
  for (auto& [name, m] : members_) {
    if (IsLive(m) && m.on_probation && now >= m.probation_until) {
      m.on_probation = false;
      ++version_;
      LOG(INFO) << "coordinator: worker " << name
                << " stayed up through its probation";
      if (placed_) Replace(name + " ended its probation", /*live=*/true, now);
    }
  }
  MaybeEndPause(now);  // After a restart's grace.
  CopyCommittedOffDrains(now);
  if (placed_ && !holding_ && move_epoch_ == epoch_ &&
      moves_done_epoch_ < epoch_ &&
      now - move_began_ >
          std::chrono::milliseconds(config_.cluster().move_timeout_ms())) {
    BumpEpoch("the shards moved in epoch " + std::to_string(epoch_) +
              " were not all in place within " +
              std::to_string(config_.cluster().move_timeout_ms()) +
              " ms (cluster.move_timeout_ms)");
    return;
  }
  if (pausing_ &&
      now - pause_began_ >
          std::chrono::milliseconds(config_.cluster().move_timeout_ms())) {
    const std::string why =
        pause_cause_ +
        "; the trainers did not all reach a step boundary within " +
        std::to_string(config_.cluster().move_timeout_ms()) +
        " ms (cluster.move_timeout_ms), so the shards move by a rollback";
    pausing_ = false;
    ++version_;
    ++routing_version_;
    LOG(WARNING) << "coordinator: " << why;
    Replace(why);
    return;
  }
  if (placed_ && !pausing_ && !holding_ && now >= next_move_check_ &&
      !TrainersUnknown(now)) {
    // A move still to make: a drain, or a worker that holds nothing while
    // the join rule would give it shards (after a coordinator restart, or
    // a hold that ended in a rollback). Checked once a lease.
    next_move_check_ =
        now + std::chrono::milliseconds(config_.cluster().lease_ms());
    std::string who;
    for (const auto& [name, m] : members_) {
      if (!IsLive(m) || m.on_probation ||
          m.record.registration().kind() != control::WORKER) {
        continue;
      }
      const int held = ShardsHeldBy(name);
      if ((m.record.draining() && held > 0) ||
          (!m.record.draining() && held == 0)) {
        who = name;
        break;
      }
    }
    if (!who.empty() && AllShardsOnLiveWorkers()) {
      const PlacementInput input = CurrentPlacementInput();
      if (MovesAny(input, ComputePlacement(input))) {
        Replace("moves still to make (" + who + ")", /*live=*/true, now);
      }
    }
  }
}

StatusOr<control::DrainResponse> ClusterState::Drain(
    const control::DrainRequest& request, Clock::time_point now) {
  auto it = members_.find(request.worker());
  if (it == members_.end() ||
      it->second.record.registration().kind() != control::WORKER) {
    return NotFoundError("drain: no worker named '" + request.worker() + "'");
  }
  Member& m = it->second;
  if (!IsLive(m)) {
    return FailedPreconditionError("drain: worker " + request.worker() +
                                   " is not alive");
  }
  control::DrainResponse response;
  if (request.cancel()) {
    if (!m.record.draining()) {
      response.set_message(request.worker() + " was not draining");
    } else {
      m.record.set_draining(false);
      ++version_;
      response.set_message("stopped draining " + request.worker());
      LOG(INFO) << "coordinator: " << response.message();
      Replace(request.worker() + " is no longer draining", /*live=*/true, now);
    }
    response.set_shards(ShardsHeldBy(request.worker()));
    return response;
  }
  if (!m.record.draining()) {
    m.record.set_draining(true);
    if (placed_) {
      // The others must hold everything: else the worker keeps serving.
      const PlacementResult result = ComputePlacement(CurrentPlacementInput());
      if (result.num_unplaced > 0) {
        m.record.set_draining(false);
        return ResourceExhaustedError(
            "cannot drain " + request.worker() +
            ": the other workers cannot hold its shards (" +
            result.status.message() + "); it keeps serving");
      }
    }
    ++version_;
    LOG(WARNING) << "coordinator: draining " << request.worker() << " ("
                 << ShardsHeldBy(request.worker()) << " shards)";
    Replace(request.worker() + " is draining", /*live=*/true, now);
  }
  response.set_shards(ShardsHeldBy(request.worker()));
  response.set_message(response.shards() == 0
                           ? request.worker() + " holds no shards; it leaves"
                           : request.worker() + " is draining: " +
                                 std::to_string(response.shards()) +
                                 " shards move at the next step boundary");
  return response;
}

void ClusterState::ConnectionLost(const std::string& name,
                                  Clock::time_point now) {
  auto it = members_.find(name);
  if (it == members_.end() || !IsLive(it->second)) return;
  const auto grace = std::chrono::milliseconds(
      std::min(int64_t{config_.cluster().lease_ms()},
               2 * int64_t{config_.cluster().heartbeat_ms()}));
  it->second.lease_deadline = std::min(it->second.lease_deadline, now + grace);
}

control::RoutingTable ClusterState::Routing() const {
  control::RoutingTable table;
  table.set_epoch(epoch_);
  table.set_placement_error(placement_error_);
  table.set_cause(epoch_cause_);
  std::map<std::string, int> index;
  for (const auto& [name, m] : members_) {
    if (m.record.registration().kind() != control::WORKER || !IsLive(m)) {
      continue;
    }
    index[name] = table.workers_size();
    auto* w = table.add_workers();
    w->set_name(name);
    w->set_data_address(m.record.registration().data_address());
    w->set_incarnation(m.record.incarnation());
    w->set_confirmed(m.record.state() == control::ALIVE);
  }
  if (!placed_) return table;
  for (size_t i = 0; i < shards_.size(); ++i) {
    auto* e = table.add_entries();
    *e->mutable_shard() = ToShardRef(shards_[i].id);
    e->set_bytes(shards_[i].bytes);
    auto w = index.find(shard_home_[i]);
    e->set_worker(!shard_unplaced_[i] && w != index.end() ? w->second : -1);
    if (continues_) e->set_moved_from(moved_from_[i]);
    if (pausing_ && i < planned_home_.size() && !planned_home_[i].empty() &&
        planned_home_[i] != shard_home_[i]) {
      e->set_moving_to(planned_home_[i]);
    }
  }
  table.set_pause(pausing_);
  table.set_pause_step(pausing_ ? pause_step_ : 0);
  table.set_resume_step(ledger_.resume_step());
  table.set_hold(holding_);
  table.set_continues(continues_);
  if (holding_ || continues_) return table;
  const control::CommittedCheckpoint* c = ledger_.Find(ledger_.resume_step());
  if (c == nullptr || c->holder_size() != table.entries_size()) return table;
  for (int i = 0; i < table.entries_size(); ++i) {
    table.mutable_entries(i)->set_resume_holder(c->holder(i));
    if (i < c->digest_size()) {
      table.mutable_entries(i)->set_resume_digest(c->digest(i));
    }
    if (i < c->replicas_size() && !c->replicas(i).empty()) {
      std::stringstream names(c->replicas(i));
      for (std::string n; std::getline(names, n, ',');) {
        table.mutable_entries(i)->add_resume_replicas(n);
      }
    }
  }
  return table;
}

control::StatusResponse ClusterState::Report(Clock::time_point now) const {
  control::StatusResponse s;
  s.set_epoch(epoch_);
  s.set_placed(placed_);
  s.set_placement_error(placement_error_);
  s.set_total_shards(static_cast<int>(shards_.size()));
  std::map<std::string, std::pair<int, int64_t>> held;
  int64_t total_bytes = 0;
  int placed = 0;
  for (size_t i = 0; i < shards_.size(); ++i) {
    total_bytes += shards_[i].bytes;
    if (placed_ && !shard_unplaced_[i]) {
      ++placed;
      auto& h = held[shard_home_[i]];
      ++h.first;
      h.second += shards_[i].bytes;
    }
  }
  s.set_total_shard_bytes(total_bytes);
  s.set_placed_shards(placed);
  for (const auto& [name, m] : members_) {
    auto* ms = s.add_members();
    const auto& reg = m.record.registration();
    ms->set_name(name);
    ms->set_kind(reg.kind());
    ms->set_state(m.record.state());
    ms->set_control_address(reg.control_address());
    ms->set_data_address(reg.data_address());
    ms->set_device(reg.device());
    ms->set_capacity_bytes(reg.capacity_bytes());
    ms->set_incarnation(m.record.incarnation());
    ms->set_rank(reg.rank());
    ms->set_pid(reg.pid());
    ms->set_host(reg.host());
    ms->set_ms_since_heartbeat(MsBetween(m.last_heartbeat, now));
    ms->set_draining(IsLive(m) && m.record.draining());
    if (IsLive(m)) {
      uint64_t tokens = 0;
      for (const auto& [shard, n] : m.tokens) tokens += n;
      ms->set_tokens(tokens);
      ms->set_copy_tokens(m.copy_tokens);
      ms->set_offloaded_tokens(m.offloaded_tokens);
      ms->set_copy_bytes(m.copy_bytes);
      for (const auto& load : m.replicated) *ms->add_replicated() = load;
    }
    if (IsLive(m) && m.on_probation) {
      ms->set_probation_ms_left(
          std::max<int64_t>(0, MsBetween(now, m.probation_until)));
    }
    if (IsLive(m)) {
      auto h = held.find(name);
      if (h != held.end()) {
        ms->set_shards(h->second.first);
        ms->set_shard_bytes(h->second.second);
      }
    }
  }
  *s.mutable_routing() = Routing();
  for (const auto& c : ledger_.committed()) *s.add_checkpoints() = c;
  for (const auto& r : recoveries_) *s.add_recoveries() = r;
  s.set_recoveries_total(recoveries_total_);
  if (pausing_) {
    s.set_pending_move(pause_cause_);
    s.set_pending_move_ms(std::max<int64_t>(0, MsBetween(pause_began_, now)));
  }
  return s;
}

}  // namespace switchyard::coordinator
