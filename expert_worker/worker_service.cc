#include "expert_worker/worker_service.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "common/digest.h"
#include "common/metrics.h"
#include "common/shard_ref.h"
#include "common/thread_name.h"
#include "expert_worker/routing_plan.h"

namespace switchyard::expert_worker {

using transport::Message;
using transport::MessageKind;

namespace {

// Idle request buffers (activations, outputs, gradient inputs) the worker
// keeps for reuse: a step's working set, so that no request touches fresh
// pages once the first steps have run.
constexpr size_t kPoolCachedBytes = size_t{1} << 30;

}  // namespace

WorkerService::WorkerService(const config::SwitchyardConfig& config,
                             std::string name)
    : config_(config),
      name_(std::move(name)),
      pool_(BufferPool::Create(kPoolCachedBytes)),
      staging_pool_(BufferPool::Create(config.checkpoint().staging_resident()
                                           ? std::numeric_limits<size_t>::max()
                                           : 0)),
      gate_(name_, config.cluster().trainers()) {}

WorkerService::~WorkerService() { Shutdown(); }

Status WorkerService::Start() {
  gemm_ = NewCpuGemm(config_.training().threads());
  ASSIGN_OR_RETURN(optimizer_, Optimizer::Create(config_.training()));
  ASSIGN_OR_RETURN(factory_, ShardFactory::Create(config_, optimizer_.get()));
  compute_ = std::make_unique<ShardCompute>(config_, factory_->shape(0),
                                            factory_->shape(1), gemm_.get(),
                                            optimizer_.get(), pool_.get());
  if (config_.replication().enabled()) {
    // Its own GEMM object: a Gemm serves one caller at a time.
    replica_gemm_ = NewCpuGemm(config_.training().threads());
    replica_host_ =
        std::make_unique<ReplicaHost>(config_, name_, factory_->shape(0),
                                      factory_->shape(1), replica_gemm_.get());
    replica_host_->Start();
  }
  ConnectReplicas();
  transfer_ = std::make_unique<ShardTransfer>(config_, name_, store_.get(),
                                              factory_.get(), StorageThreads());
  transfer_->set_peers(peers_);
  if (writer_ != nullptr) {
    transfer_->set_memory([writer = writer_.get()](int64_t step) {
      return writer->KeptAt(step);
    });
  }
  // Serves checkpoint fetches (with a store) and live moves' handovers.
  fetch_server_ = std::make_unique<CheckpointFetchServer>(
      name_, store_.get(),
      [this] { return adopted_epoch_.load(std::memory_order_acquire); },
      [this](uint64_t epoch, int64_t step, const std::string& shard) {
        return HandedOver(epoch, step, shard);
      });
  thread_ = StartNamedThread("sy-worker", [this] { Run(); });
  routing_thread_ = StartNamedThread("sy-routing", [this] { RoutingLoop(); });
  if (writer_ != nullptr) writer_->Start();
  fetch_server_->Start();
  return OkStatus();
}

void WorkerService::EnableCheckpoints(
    std::unique_ptr<storage::CheckpointStore> store,
    CheckpointReporter report) {
  store_ = std::move(store);
  report_ = std::move(report);
  writer_ = std::make_unique<CheckpointWriter>(
      name_, store_.get(), staging_pool_.get(), StorageThreads(), report_,
      [this](const control::ReplicationTask& task) {
        // A committed checkpoint never changes: the copy is fetched under
        // the newest epoch this worker has adopted, which the holder, as
        // current as this worker or more, does not refuse as stale (the
        // task's own epoch may have passed while it waited in the queue,
        // and a refused copy is queued again only after
        // cluster.move_timeout_ms).
        control::ReplicationTask now = task;
        now.set_epoch(std::max<uint64_t>(
            task.epoch(), adopted_epoch_.load(std::memory_order_acquire)));
        return transfer_->Replicate(now, report_);
      },
      config_.checkpoint().max_consecutive_failures(),
      // Kept copies are staging buffers: none without resident staging.
      config_.checkpoint().rollback_in_memory() &&
          config_.checkpoint().staging_resident());
}

void WorkerService::SetPeerPlane(transport::DataPlane* plane) {
  peers_ = plane;
  if (transfer_ != nullptr) transfer_->set_peers(plane);
  ConnectReplicas();
}

void WorkerService::ConnectReplicas() {
  if (!config_.replication().enabled() || peers_ == nullptr ||
      compute_ == nullptr || replica_client_ != nullptr) {
    return;
  }
  {
    MutexLock lock(&waker_->mu);
    waker_->queue = &queue_;
  }
  replica_client_ =
      std::make_unique<ReplicaClient>(config_, name_, peers_, [waker = waker_] {
        MutexLock lock(&waker->mu);
        if (waker->queue != nullptr) waker->queue->Interrupt();
      });
  compute_->set_replicas(replica_client_.get());
}

int WorkerService::StorageThreads() const {
  const int threads = config_.training().threads();
  return threads > 0 ? threads
                     : static_cast<int>(std::thread::hardware_concurrency());
}

void WorkerService::Replicate(control::ReplicationTask task) {
  if (writer_ != nullptr) writer_->Replicate(std::move(task));
}

void WorkerService::WaitCheckpointsWritten() {
  if (writer_ != nullptr) writer_->WaitWritten();
}

void WorkerService::DropCheckpointsBefore(int64_t step) {
  if (writer_ != nullptr) writer_->DropBefore(step);
}

void WorkerService::NoteCommitted(int64_t step) {
  if (writer_ != nullptr) writer_->NoteCommitted(step);
}

void WorkerService::Shutdown() {
  if (queue_.closed()) return;
  queue_.Close();  // Handle() refuses from now on.
  {
    // A table being applied is finished first.
    MutexLock lock(&routing_mu_);
    routing_stop_ = true;
  }
  routing_cv_.NotifyAll();
  if (routing_thread_.joinable()) routing_thread_.join();
  if (thread_.joinable()) thread_.join();
  {
    MutexLock lock(&waker_->mu);
    waker_->queue = nullptr;
  }
  if (replica_host_ != nullptr) replica_host_->Shutdown();
  // A checkpoint being written is finished (it may be committed).
  if (writer_ != nullptr) writer_->Shutdown();
  if (fetch_server_ != nullptr) fetch_server_->Shutdown();
  // Whatever was queued or deferred is answered, never dropped silently.
  std::vector<Task> unanswered;
  {
    MutexLock state(&mu_);
    unanswered = queue_.Drain();
    for (Task& t : gate_.TakeDeferred()) unanswered.push_back(std::move(t));
  }
  AnswerShuttingDown(std::move(unanswered), name_);
}

namespace {

// A shard handed over here that was made ahead (`ahead`, counted in
// `premade`), else a new one from `make`.
template <typename Key, typename Shard, typename Make>
StatusOr<std::unique_ptr<Shard>> TakeOrMake(
    std::map<Key, std::unique_ptr<Shard>>* ahead, const Key& key, bool handed,
    int* premade, const Make& make) {
  auto it = ahead->find(key);
  if (!handed || it == ahead->end()) return make();
  ++*premade;
  std::unique_ptr<Shard> shard = std::move(it->second);
  ahead->erase(it);
  return shard;
}

}  // namespace

Status WorkerService::ApplyRouting(const control::RoutingTable& routing) {
  MutexLock applying(&apply_mu_);
  // This thread may compute (the chunks copies did not answer, an update):
  // with the compute thread's kernel threads, as the bits require.
  SetKernelThreads(config_.training().threads());
  // What is hosted now; only this function (under apply_mu_) changes it.
  std::set<ShardId> have;
  std::set<int> have_dense;
  int64_t next_step = 0;
  std::vector<Task> abandoned;
  bool holding = false;
  {
    MutexLock lock(&mu_);
    // The last epoch's computations waiting for copies end first, so that
    // their copies' failures count in that epoch, not in this one.
    FinishAllLocked();
    // Chunks of replicated shards go to this table's workers.
    if (replica_client_ != nullptr) replica_client_->SetRouting(routing);
    // A routing change sees (and may hand over, roll back or keep) the
    // shards with the last update applied. After a failed update they are
    // refused until a rollback replaces them (below).
    (void)SettleAllLocked();
    if (routing.epoch() < gate_.epoch() ||
        (routing.epoch() == gate_.epoch() && gate_.open())) {
      // The same placement (a table re-sent when a worker's address is
      // confirmed, or pausing for a move): only who this worker is in it
      // may have changed.
      for (const auto& w : routing.workers()) {
        if (w.name() == name_) adopted_incarnation_ = w.incarnation();
      }
      const bool current = routing.epoch() == gate_.epoch();
      lock.Unlock();
      if (current) Premake(routing);
      return OkStatus();
    }
    // A new epoch: nothing of the old one is served from now on, and the
    // step in flight is abandoned everywhere (the trainers redo it, or roll
    // back further, under the new epoch), or, at a hold, stopped.
    // Serving the epoch just before the hold: this worker holds that
    // epoch's shards and the gradients of its step in flight. (One that
    // skipped an epoch, e.g. a rollback applied by the others, does not.)
    const bool was_serving =
        gate_.open() && gate_.epoch() + 1 == routing.epoch();
    abandoned = gate_.Fence(routing.epoch());
    gradients_due_.clear();
    adopted_epoch_.store(routing.epoch(), std::memory_order_release);
    if (routing.hold()) {
      SetHeld(Held{routing.epoch(), gate_.next_step(), was_serving});
      holding = true;
    } else if (routing.continues() && held_.has_value() && held_->serving &&
               held_->epoch + 1 == routing.epoch() &&
               gate_.next_step() + 1 == routing.resume_step()) {
      // The others applied the step: every trainer had finished it, so
      // its gradients are all here.
      LOG(INFO) << name_ << ": epoch " << routing.epoch()
                << " continues from step " << routing.resume_step()
                << ": applying update " << gate_.next_step()
                << " from the gradients held";
      RETURN_IF_ERROR(CompleteStep());
      SetHeld(std::nullopt);
    } else {
      for (auto& [id, shard] : shards_) AbandonStep(shard.get());
      for (auto& [index, shard] : dense_) AbandonStep(shard.get());
      SetHeld(std::nullopt);
    }
    for (const auto& [id, shard] : shards_) have.insert(id);
    for (const auto& [index, shard] : dense_) have_dense.insert(index);
    next_step = gate_.next_step();
  }
  for (Task& t : abandoned) {
    t.reply(transport::ErrorResponse(
        t.request.header,
        FailedPreconditionError(
            "step " + std::to_string(t.request.header.step) +
            " abandoned: " + name_ + " moved to epoch " +
            std::to_string(routing.epoch()) + "; refresh the routing")));
  }
  if (holding) {
    LOG(INFO) << name_ << ": epoch " << routing.epoch()
              << " holds the cluster: stopped at step " << next_step;
    // What was handed over stays through a hold: a new home may still be
    // fetching it.
    if (on_news_) on_news_();
    return OkStatus();
  }
  const RoutingPlan plan =
      PlanRouting(routing, name_, have, have_dense, next_step);
  HandOver(routing, plan);
  if (plan.rolls_back) {
    LOG(WARNING) << name_ << ": epoch " << routing.epoch()
                 << ": rolling back from step " << next_step << " to step "
                 << routing.resume_step()
                 << (plan.restore ? " (the newest committed checkpoint)"
                                  : " (initial values: nothing committed)");
  }
  // New shards are made (and restored) outside mu_: initialising or reading
  // gigabytes takes seconds, and requests of the current epoch go on.
  // Restored ones start zero-filled: the checkpoint overwrites every tensor
  // (Restore checks each against the model's).
  std::map<ShardId, std::unique_ptr<ExpertShard>> made;
  std::map<int, std::unique_ptr<DenseShard>> made_dense;
  std::vector<storage::ShardSnapshot> to_restore, to_take_over;
  // Shards handed over come made ahead where the pause planned them here
  // (Premake); what was made ahead and not moved here is dropped.
  int premade = 0;
  for (int index : plan.make_dense) {
    const bool handed = plan.handover_dense.count(index) > 0;
    ASSIGN_OR_RETURN(made_dense[index],
                     TakeOrMake(&premade_dense_, index, handed, &premade, [&] {
                       return factory_->NewDense(index,
                                                 !plan.restore && !handed);
                     }));
    (handed ? to_take_over : to_restore)
        .push_back(
            SnapshotOf(*made_dense[index], *staging_pool_, /*deep=*/false));
  }
  for (const ShardId& id : plan.make_experts) {
    const bool handed = plan.handover_experts.count(id) > 0;
    ASSIGN_OR_RETURN(made[id], TakeOrMake(&premade_, id, handed, &premade, [&] {
                       return factory_->NewExpert(id, !plan.restore && !handed);
                     }));
    (handed ? to_take_over : to_restore)
        .push_back(SnapshotOf(*made[id], *staging_pool_, /*deep=*/false));
  }
  premade_.clear();
  premade_dense_.clear();
  if (premade > 0) {
    MetricsRegistry::Global()
        .GetCounter("switchyard_worker_shards_made_ahead_total")
        ->Increment(premade);
  }
  // Until the shards are restored (or taken over) the worker's gate stays
  // closed, so requests of the new epoch are refused as not ready
  // (ABORTED), never served from initial values; a later table retries.
  if (plan.restore) {
    RETURN_IF_ERROR(transfer_->Restore(routing, std::move(to_restore)));
  }
  RETURN_IF_ERROR(transfer_->TakeOver(routing, std::move(to_take_over)));
  if ((plan.restore || !plan.handover_experts.empty()) &&
      factory_->shape(1).compute_dtype == DType::kBF16) {
    for (auto& [id, shard] : made) {
      RETURN_IF_ERROR(shard->params.RefreshBf16());
    }
  }
  // The new shards' tensors (shallow: their shapes) for the staging
  // warm-up below.
  std::vector<storage::ShardSnapshot> staged;
  if (writer_ != nullptr && config_.checkpoint().every() > 0 &&
      config_.checkpoint().staging_resident()) {
    for (auto& [index, shard] : made_dense) {
      staged.push_back(SnapshotOf(*shard, *staging_pool_, /*deep=*/false));
    }
    for (auto& [id, shard] : made) {
      staged.push_back(SnapshotOf(*shard, *staging_pool_, /*deep=*/false));
    }
  }
  MutexLock lock(&mu_);
  for (auto it = dense_.begin(); it != dense_.end();) {
    it = plan.dense.count(it->first) ? std::next(it) : dense_.erase(it);
  }
  for (auto it = shards_.begin(); it != shards_.end();) {
    it = plan.experts.count(it->first) ? std::next(it) : shards_.erase(it);
  }
  for (auto& [index, shard] : made_dense) dense_[index] = std::move(shard);
  for (auto& [id, shard] : made) shards_[id] = std::move(shard);
  {
    // The load report lists the shards hosted now (their counts kept).
    MutexLock loads(&loads_mu_);
    std::map<ShardId, LoadCount> hosted;
    for (const auto& [id, shard] : shards_) hosted[id] = loads_[id];
    loads_ = std::move(hosted);
  }
  if (plan.rolls_back && !apply_failed_.ok()) {
    LOG(INFO) << name_ << ": every shard is made again at step "
              << routing.resume_step() << ": serving after the failed update";
    apply_failed_ = OkStatus();
  }
  gate_.Open(routing.resume_step());
  open_epoch_.store(routing.epoch(), std::memory_order_release);
  adopted_incarnation_ = 0;
  for (const auto& w : routing.workers()) {
    if (w.name() == name_) adopted_incarnation_ = w.incarnation();
  }
  lock.Unlock();
  if (on_news_) on_news_();
  // The new shards' staging buffers, touched now (all held at once, so
  // that none reuses another's) rather than in the first checkpoint's
  // step; after the gate opens, so that faulting memory in (hundreds of
  // MB/s on some VMs) is not part of the step that switches over. Only
  // touched, never filled from the shards, which the step now changes.
  std::vector<Tensor> warm;
  for (const storage::ShardSnapshot& s : staged) {
    for (const auto& t : s.tensors) {
      if (t.tensor.empty()) continue;
      StatusOr<Tensor> buffer =
          staging_pool_->Take(t.tensor.dtype(), t.tensor.shape());
      if (!buffer.ok()) break;  // A checkpoint will say so, clearly.
      std::memset(buffer->data(), 0, buffer->num_bytes());
      warm.push_back(std::move(buffer).value());
    }
  }
  Premake(routing);  // A joiner's first table may already pause.
  return OkStatus();
}

void WorkerService::Premake(const control::RoutingTable& routing) {
  // What this table plans here; anything else made ahead goes (a move
  // called off or planned elsewhere, a pause that ended without one).
  std::set<ShardId> planned;
  if (routing.pause() && !routing.hold()) {
    for (const auto& e : routing.entries()) {
      if (e.moving_to() == name_) planned.insert(FromShardRef(e.shard()));
    }
  }
  for (auto it = premade_.begin(); it != premade_.end();) {
    it = planned.count(it->first) ? std::next(it) : premade_.erase(it);
  }
  for (auto it = premade_dense_.begin(); it != premade_dense_.end();) {
    it = planned.count(ShardId::Dense(it->first)) ? std::next(it)
                                                  : premade_dense_.erase(it);
  }
  if (planned.empty()) return;
  std::set<ShardId> hosted;
  {
    MutexLock lock(&mu_);
    for (const auto& [id, shard] : shards_) hosted.insert(id);
    for (const auto& [index, shard] : dense_) {
      hosted.insert(ShardId::Dense(index));
    }
  }
  int made = 0;
  for (const auto& e : routing.entries()) {
    if (e.moving_to() != name_) continue;
    // The connection to the old home, opened now rather than by the
    // handover's first fetch.
    if (peers_ != nullptr && e.worker() >= 0 &&
        e.worker() < routing.workers_size()) {
      peers_->Connect(routing.workers(e.worker()).data_address());
    }
    const ShardId id = FromShardRef(e.shard());
    if (hosted.count(id)) continue;
    // Zero-filled, as a shard taken over is made (ApplyRouting).
    if (id.is_expert() && !premade_.count(id)) {
      StatusOr<std::unique_ptr<ExpertShard>> shard =
          factory_->NewExpert(id, /*initialise=*/false);
      if (!shard.ok()) return;  // The move itself will say why.
      premade_[id] = std::move(shard).value();
      ++made;
    } else if (!id.is_expert() && !premade_dense_.count(id.shard)) {
      StatusOr<std::unique_ptr<DenseShard>> shard =
          factory_->NewDense(id.shard, /*initialise=*/false);
      if (!shard.ok()) return;
      premade_dense_[id.shard] = std::move(shard).value();
      ++made;
    }
  }
  if (made > 0) {
    LOG(INFO) << name_ << ": made " << made
              << " shards ahead of the move planned here (epoch "
              << routing.epoch() << " pauses for it)";
  }
}

void WorkerService::HandOver(const control::RoutingTable& routing,
                             const RoutingPlan& plan) {
  std::map<std::string, HandedOverShard> handed;
  if (routing.continues()) {
    std::set<std::string> leaving;
    for (const auto& e : routing.entries()) {
      if (e.moved_from() == name_) {
        leaving.insert(FromShardRef(e.shard()).ToString());
      }
    }
    // The gate is closed: nothing changes these shards any more. Shallow
    // copies keep their storage alive after the shards are dropped.
    MutexLock lock(&mu_);
    // An update the end of a hold applied, whole; after a failed one
    // nothing is handed over (the run stops).
    if (Status s = SettleAllLocked(); !s.ok()) {
      LOG(ERROR) << name_ << ": hands nothing over: " << s.ToString();
      return;
    }
    for (const auto& [id, shard] : shards_) {
      if (plan.experts.count(id) || !leaving.count(id.ToString())) continue;
      handed[id.ToString()] = {routing.epoch(), gate_.next_step(),
                               std::make_shared<const storage::ShardSnapshot>(
                                   SnapshotOf(*shard, *staging_pool_, false))};
    }
    for (const auto& [index, shard] : dense_) {
      const std::string id = ShardId::Dense(index).ToString();
      if (plan.dense.count(index) || !leaving.count(id)) continue;
      handed[id] = {routing.epoch(), gate_.next_step(),
                    std::make_shared<const storage::ShardSnapshot>(
                        SnapshotOf(*shard, *staging_pool_, false))};
    }
  }
  if (!handed.empty()) {
    LOG(INFO) << name_ << ": hands " << handed.size() << " shards over at step "
              << handed.begin()->second.step << " (epoch " << routing.epoch()
              << ")";
  }
  // What goes is freed after the lock (hundreds of MB, perhaps: the data
  // plane's thread answers handovers under it).
  std::map<std::string, HandedOverShard> dropped;
  MutexLock lock(&handover_mu_);
  if (!routing.continues()) {
    // A rollback: the shards restore from the checkpoint, nothing handed
    // over is fetched any more.
    dropped.swap(handed_over_);
  }
  for (auto& [name, shard] : handed) {
    std::swap(handed_over_[name], shard);  // Any older copy into `handed`.
  }
  handover_epoch_ = routing.epoch();
  lock.Unlock();
}

StatusOr<std::shared_ptr<const storage::ShardSnapshot>>
WorkerService::HandedOver(uint64_t epoch, int64_t step,
                          const std::string& shard) const {
  MutexLock lock(&handover_mu_);
  if (epoch > handover_epoch_) {
    return AbortedError(name_ + " has not handed over the shards of epoch " +
                        std::to_string(epoch) + " yet; retry");
  }
  auto it = handed_over_.find(shard);
  if (it == handed_over_.end() || it->second.epoch != epoch ||
      it->second.step != step) {
    return NotFoundError(name_ + " did not hand over " + shard + " at step " +
                         std::to_string(step) + " in epoch " +
                         std::to_string(epoch));
  }
  return it->second.snapshot;
}

void WorkerService::NoteMovesDone(uint64_t epoch) {
  std::vector<HandedOverShard> dropped;  // Freed after the lock.
  MutexLock lock(&handover_mu_);
  for (auto it = handed_over_.begin(); it != handed_over_.end();) {
    if (it->second.epoch <= epoch) {
      dropped.push_back(std::move(it->second));
      it = handed_over_.erase(it);
    } else {
      ++it;
    }
  }
  lock.Unlock();
}

void WorkerService::OfferRouting(const control::RoutingTable& routing) {
  {
    MutexLock lock(&routing_mu_);
    if (offered_.has_value() && offered_->epoch() > routing.epoch()) return;
    offered_ = routing;
  }
  routing_cv_.NotifyAll();
}

void WorkerService::RoutingLoop() {
  while (true) {
    control::RoutingTable routing;
    {
      MutexLock lock(&routing_mu_);
      while (!routing_stop_ && !offered_.has_value()) {
        routing_cv_.Wait(&routing_mu_);
      }
      if (routing_stop_) return;
      routing = std::move(*offered_);
      offered_.reset();
    }
    Status s = ApplyRouting(routing);
    if (!s.ok()) {
      // The worker stays at its previous epoch (requests of the new one are
      // refused as not ready) and tries again: with the next table, or this
      // one after a second when none comes.
      LOG(WARNING) << name_ << ": cannot adopt epoch " << routing.epoch()
                   << " yet (retried in 1 s or with the next routing table): "
                   << s.ToString();
      MutexLock lock(&routing_mu_);
      const auto retry_at =
          std::chrono::steady_clock::now() + std::chrono::seconds(1);
      while (!routing_stop_ && !offered_.has_value()) {
        if (!routing_cv_.WaitUntil(&routing_mu_, retry_at)) break;
      }
      if (!offered_.has_value()) offered_ = std::move(routing);
    }
  }
}

void WorkerService::Handle(Message request, transport::Reply reply) {
  const uint8_t kind = request.header.kind;
  if (kind >= static_cast<uint8_t>(MessageKind::kReplicaWeights) &&
      kind <= static_cast<uint8_t>(MessageKind::kReplicaDrop)) {
    if (replica_host_ == nullptr) {
      reply(transport::ErrorResponse(
          request.header,
          FailedPreconditionError(name_ + " hosts no copies (replication "
                                          "is off, or it is starting up)")));
      return;
    }
    replica_host_->Handle({std::move(request), std::move(reply)});
    return;
  }
  if (request.header.kind ==
          static_cast<uint8_t>(MessageKind::kCheckpointFetch) ||
      request.header.kind ==
          static_cast<uint8_t>(MessageKind::kShardHandover)) {
    if (fetch_server_ == nullptr) {
      reply(transport::ErrorResponse(
          request.header, AbortedError(name_ + " is starting up; retry")));
      return;
    }
    fetch_server_->Serve({std::move(request), std::move(reply)});
    return;
  }
  std::optional<Task> refused =
      queue_.Push({std::move(request), std::move(reply)});
  if (refused) AnswerShuttingDown({std::move(*refused)}, name_);
}

void WorkerService::Run() {
  SetKernelThreads(config_.training().threads());
  // Process-wide metrics (common/metrics.h): what the worker computes and
  // how much waits for it.
  auto& registry = MetricsRegistry::Global();
  Gauge* queue_depth = registry.GetGauge("switchyard_worker_queue_depth");
  Gauge* waiting = registry.GetGauge("switchyard_worker_waiting_next_step");
  Counter* requests = registry.GetCounter("switchyard_worker_requests_total");
  Counter* errors = registry.GetCounter("switchyard_worker_refused_total");
  Counter* tokens = registry.GetCounter("switchyard_worker_tokens_total");
  Histogram* compute_ms =
      registry.GetHistogram("switchyard_worker_request_ms", LatencyBucketsMs());
  // The compute thread's time: serving and settling, or waiting for work.
  Counter* busy_us =
      registry.GetCounter("switchyard_worker_busy_microseconds_total");
  Counter* idle_us =
      registry.GetCounter("switchyard_worker_idle_microseconds_total");
  while (true) {
    // With an update still to apply, the thread applies it while no
    // request waits (a shard at a time, looking again in between).
    // Computations whose copies have answered are finished first. While
    // others wait for their copies, the thread serves what comes, and
    // waits for requests only until a copy answers (the ReplicaClient
    // interrupts the wait) or the oldest one's copies are due.
    bool settling = false;
    std::optional<ReplicaClient::Deadline> copies_due;
    {
      MutexLock state(&mu_);
      FinishReadyLocked();
      settling = unsettled_ > 0 || !gradients_due_.empty();
      if (!unfinished_.empty()) copies_due = unfinished_.front().rest.due();
    }
    std::optional<Task> task;
    {
      ScopedMicros idle(idle_us);
      task = settling     ? queue_.PopUntil(std::chrono::steady_clock::now())
             : copies_due ? queue_.PopUntil(*copies_due)
                          : queue_.Pop();
    }
    ScopedMicros busy(busy_us);
    if (!task.has_value()) {
      MutexLock state(&mu_);
      if (queue_.closed()) {
        FinishAllLocked();
        break;
      }
      if (!SettleNextLocked()) EarlyGradientsLocked();
      continue;
    }
    queue_depth->Set(static_cast<double>(queue_.size()));
    MutexLock state(&mu_);
    requests->Increment();
    if (task->request.header.kind ==
        static_cast<uint8_t>(MessageKind::kExpertForward)) {
      tokens->Increment(static_cast<uint64_t>(task->request.header.rows));
    }
    // Count refusals by wrapping the reply.
    transport::Reply reply = std::move(task->reply);
    task->reply = [reply = std::move(reply), errors](Message response) {
      if (response.header.status_code != 0) errors->Increment();
      reply(std::move(response));
    };
    const auto start = std::chrono::steady_clock::now();
    Process(std::move(*task));
    compute_ms->Observe(std::chrono::duration<double, std::milli>(
                            std::chrono::steady_clock::now() - start)
                            .count());
    waiting->Set(static_cast<double>(gate_.num_deferred()));
  }
}

void WorkerService::Process(Task task) {
  const transport::WireHeader& h = task.request.header;
  auto reply = [&](const Status& s, Tensor out) {
    task.reply(s.ok() ? transport::TensorResponse(h, std::move(out))
                      : transport::ErrorResponse(h, s));
  };
  const auto kind = static_cast<MessageKind>(h.kind);
  // Answered at any epoch: it asks whether this thread still serves.
  if (kind == MessageKind::kProbe) return reply(OkStatus(), Tensor());
  if (Status s = gate_.CheckEpoch(h); !s.ok()) return reply(s, {});
  if (kind == MessageKind::kEcho) {
    return reply(InvalidArgumentError("a worker does not serve " +
                                      transport::DescribeHeader(h)),
                 {});
  }
  Status why;
  switch (gate_.Admit(h, &why)) {
    case StepGate::Verdict::kRefuse:
      return reply(why, {});
    case StepGate::Verdict::kDefer:
      return gate_.Defer(std::move(task));  // Runs once update t is applied.
    case StepGate::Verdict::kServe:
      break;
  }
  if (kind == MessageKind::kStepDone) {
    FinishAllLocked();  // Every answer of the step is out before it ends.
    return reply(StepDone(h), Tensor());
  }
  if (kind == MessageKind::kDensePull || kind == MessageKind::kDensePush) {
    Tensor out;
    Status s = Dense(task.request, &out);
    return reply(s, std::move(out));
  }
  const ShardId id = ShardId::Expert(h.layer, h.expert, h.shard);
  auto it = shards_.find(id);
  if (it == shards_.end()) {
    return reply(
        NotFoundError("shard " + id.ToString() + " is not hosted by " + name_ +
                      " at epoch " + std::to_string(gate_.epoch())),
        {});
  }
  const Tensor& payload = task.request.payload;
  // A trainer sends every shard of a layer its forward and backward, with
  // no payload when it has no rows for it (the shard gathers every rank's).
  const bool gathered = kind != MessageKind::kExpertEval;
  if ((payload.empty() && !gathered) ||
      (!payload.empty() &&
       (payload.rank() != 2 || payload.dim(1) != config_.model().d_model()))) {
    return reply(
        InvalidArgumentError(
            "payload " + (payload.empty() ? "<none>" : payload.DebugString()) +
            " is not (tokens, d_model = " +
            std::to_string(config_.model().d_model()) + ")"),
        {});
  }
  ExpertShard* shard = it->second.get();
  std::vector<Task> tasks;
  if (gathered) {
    const int micro_batches = config_.training().micro_batches();
    if (h.micro_batch < 0 || h.micro_batch >= micro_batches) {
      return reply(
          InvalidArgumentError("micro-batch " + std::to_string(h.micro_batch) +
                               " is outside [0, training.micro_batches = " +
                               std::to_string(micro_batches) + ")"),
          {});
    }
    if (Status s = ShardCompute::CheckNew(h, *shard); !s.ok()) {
      return reply(s, {});
    }
    StatusOr<std::vector<Task>> all = gate_.Gather(&task);
    if (!all.ok()) return reply(all.status(), {});
    if (all->empty()) return;  // Waits for the other ranks' requests.
    tasks = *std::move(all);
  } else {
    tasks.push_back(std::move(task));
  }
  // Every rank's rows in one batch, each answered its own.
  std::vector<const Message*> requests;
  for (const Task& t : tasks) requests.push_back(&t.request);
  std::vector<Tensor> outs;
  // The shard's part of the last update first (only this shard's).
  Status s = SettleLocked(shard);
  // Training chunks on copies elsewhere are waited for later: the thread
  // serves what else has come meanwhile.
  std::optional<ShardCompute::Unfinished> later;
  std::optional<ShardCompute::Unfinished>* defer = gathered ? &later : nullptr;
  if (s.ok()) {
    s = kind == MessageKind::kExpertBackward
            ? compute_->Backward(requests, shard, &outs, defer)
            : compute_->Forward(requests, shard, &outs, defer);
  }
  if (s.ok() && later.has_value()) {
    unfinished_.push_back({std::move(tasks), shard, kind, std::move(*later)});
    return;
  }
  AnswerLocked(&tasks, shard, kind, s, &outs);
}

void WorkerService::AnswerLocked(std::vector<Task>* tasks, ExpertShard* shard,
                                 MessageKind kind, const Status& s,
                                 std::vector<Tensor>* outs) {
  if (s.ok() && kind == MessageKind::kExpertForward) {
    uint64_t tokens = 0;
    for (const Tensor& out : *outs) tokens += out.empty() ? 0 : out.dim(0);
    MutexLock loads(&loads_mu_);
    loads_[shard->id].tokens += tokens;
  }
  // Its gradient is computed while the worker has nothing else to do.
  if (s.ok() && compute_->GradientsDue(*shard)) {
    gradients_due_.push_back(shard->id);
  }
  for (size_t r = 0; r < tasks->size(); ++r) {
    Task& t = (*tasks)[r];
    const transport::WireHeader& hr = t.request.header;
    // Answered in the dtype the request came in.
    StatusOr<Tensor> converted =
        !s.ok() ? StatusOr<Tensor>(s)
        : (*outs)[r].empty()
            ? StatusOr<Tensor>(Tensor())
            : pool_->Converted((*outs)[r], t.request.payload.dtype());
    t.reply(converted.ok()
                ? transport::TensorResponse(hr, *std::move(converted))
                : transport::ErrorResponse(hr, converted.status()));
  }
}

bool WorkerService::FinishOldestLocked() {
  if (unfinished_.empty()) return false;
  Unfinished u = std::move(unfinished_.front());
  unfinished_.pop_front();
  std::vector<Tensor> outs;
  const Status s = u.rest.finish(&outs);
  AnswerLocked(&u.tasks, u.shard, u.kind, s, &outs);
  return true;
}

void WorkerService::FinishReadyLocked() {
  // Oldest first, so that a shard's micro-batches finish in order.
  while (!unfinished_.empty() && unfinished_.front().rest.ready()) {
    FinishOldestLocked();
  }
}

void WorkerService::FinishAllLocked() {
  while (FinishOldestLocked()) {
  }
}

Status WorkerService::Dense(const Message& request, Tensor* out) {
  const auto& h = request.header;
  auto it = dense_.find(h.shard);
  if (it == dense_.end()) {
    return NotFoundError("dense shard D" + std::to_string(h.shard) +
                         " is not hosted by " + name_ + " at epoch " +
                         std::to_string(gate_.epoch()));
  }
  RETURN_IF_ERROR(SettleLocked(it->second.get()));
  if (static_cast<MessageKind>(h.kind) == MessageKind::kDensePull) {
    *out = ShardCompute::Pull(*it->second);
    return OkStatus();
  }
  return ShardCompute::Push(h, request.payload, it->second.get());
}

Status WorkerService::StepDone(const transport::WireHeader& h) {
  if (!gate_.MarkDone(h.step, h.trainer_rank)) return OkStatus();
  return CompleteStep();
}

Status WorkerService::CompleteStep() {
  if (writer_ != nullptr) RETURN_IF_ERROR(writer_->Healthy());
  RETURN_IF_ERROR(ApplyUpdate(gate_.next_step()));
  // Requests for the next step that arrived early run now, in arrival order.
  queue_.PushFront(gate_.Advance());
  AfterUpdate();
  return OkStatus();
}

Status WorkerService::ApplyUpdate(int64_t step) {
  if (writer_ != nullptr) RETURN_IF_ERROR(writer_->WaitForStagingCopy(step));
  // What is left of the previous update goes first: its gradients are
  // about to be overwritten.
  RETURN_IF_ERROR(SettleAllLocked());
  // All or nothing: every shard's gradient is computed and checked before
  // any shard changes. A non-finite gradient stops the run here, with the
  // step's update applied nowhere (the last checkpoint stays good).
  Status refused;
  for (auto& [id, shard] : shards_) {
    refused = compute_->Gradients(shard.get());
    if (!refused.ok()) break;
  }
  for (auto& [index, shard] : dense_) {
    if (!refused.ok()) break;
    refused = compute_->Gradients(shard.get());
  }
  if (!refused.ok()) {
    gradients_due_.clear();
    DropGradientsLocked();  // Those already computed go with the rest.
    return refused.WithContext(name_ + " refuses update " +
                               std::to_string(step) +
                               " (nothing of it applied; the run stops: lower "
                               "training.learning_rate or check the data)");
  }
  // The step is taken: it counts into the replication plans.
  if (config_.replication().enabled()) {
    MutexLock loads(&loads_mu_);
    for (auto& [id, shard] : shards_) {
      loads_[id].replicas = compute_->AdvancePlan(step, shard.get());
    }
  }
  // Applied shard by shard from now on (SettleLocked).
  unsettled_ = 0;
  for (auto& [id, shard] : shards_) unsettled_ += shard->grads_ready ? 1 : 0;
  for (auto& [index, shard] : dense_) unsettled_ += shard->grad.empty() ? 0 : 1;
  pending_update_ = unsettled_ > 0 ? step : -1;
  gradients_due_.clear();
  return OkStatus();
}

Status WorkerService::SettleLocked(ExpertShard* shard) const {
  if (!apply_failed_.ok() || !shard->grads_ready) return apply_failed_;
  const Status s = compute_->Apply(pending_update_, shard);
  if (!s.ok()) return ApplyFailedLocked(s, shard->id.ToString());
  compute_->PushAhead(pending_update_ + 1, *shard);
  if (--unsettled_ == 0) pending_update_ = -1;
  return OkStatus();
}

Status WorkerService::SettleLocked(DenseShard* shard) const {
  if (!apply_failed_.ok() || shard->grad.empty()) return apply_failed_;
  const Status s = compute_->Apply(pending_update_, shard);
  if (!s.ok()) {
    return ApplyFailedLocked(s, "D" + std::to_string(shard->index));
  }
  if (--unsettled_ == 0) pending_update_ = -1;
  return OkStatus();
}

Status WorkerService::ApplyFailedLocked(const Status& why,
                                        const std::string& shard) const {
  apply_failed_ = why.WithContext(
      name_ + ": update " + std::to_string(pending_update_) + " of " + shard +
      " failed half way: its shards are refused until a rollback replaces "
      "them");
  LOG(ERROR) << apply_failed_.ToString();
  DropGradientsLocked();  // Nothing more of the update is applied.
  unsettled_ = 0;
  pending_update_ = -1;
  return apply_failed_;
}

void WorkerService::DropGradientsLocked() const {
  for (const auto& [id, shard] : shards_) shard->grads_ready = false;
  for (const auto& [index, shard] : dense_) shard->grad = Tensor();
}

Status WorkerService::SettleAllLocked() const {
  for (const auto& [index, shard] : dense_) {
    RETURN_IF_ERROR(SettleLocked(shard.get()));
  }
  for (const auto& [id, shard] : shards_) {
    RETURN_IF_ERROR(SettleLocked(shard.get()));
  }
  return apply_failed_;
}

bool WorkerService::SettleNextLocked() {
  if (unsettled_ == 0 || !apply_failed_.ok()) return false;
  for (auto& [index, shard] : dense_) {
    if (!shard->grad.empty()) {
      (void)SettleLocked(shard.get());  // A failure answers what comes next.
      return true;
    }
  }
  for (auto& [id, shard] : shards_) {
    if (shard->grads_ready) {
      (void)SettleLocked(shard.get());
      return true;
    }
  }
  unsettled_ = 0;
  pending_update_ = -1;
  return false;
}

bool WorkerService::EarlyGradientsLocked() {
  static Counter* early = MetricsRegistry::Global().GetCounter(
      "switchyard_worker_early_gradients_total");
  while (!gradients_due_.empty()) {
    const ShardId id = gradients_due_.front();
    gradients_due_.erase(gradients_due_.begin());
    auto it = shards_.find(id);
    if (it == shards_.end() || !compute_->GradientsDue(*it->second)) continue;
    compute_->EarlyGradients(it->second.get());
    early->Increment();
    return true;
  }
  return false;
}

void WorkerService::AfterUpdate() {
  const int64_t next = gate_.next_step();
  const auto& tr = config_.training();
  const bool run_ends = next == tr.steps() || next == tr.stop_at_step();
  // Checkpoints every `every` steps, and where the run ends or stops.
  const int every = config_.checkpoint().every();
  const bool due =
      writer_ != nullptr && every > 0 && (next % every == 0 || run_ends);
  if (!due && next != tr.steps()) return;
  // A checkpoint or the digests hold the whole update.
  if (Status s = SettleAllLocked(); !s.ok()) {
    LOG(ERROR) << name_ << ": no checkpoint of step " << next << ": "
               << s.ToString();
    return;
  }
  if (due) {
    writer_->Stage(SnapshotsLocked(/*deep=*/false), run_ends,
                   adopted_incarnation_);
  }
  if (next == tr.steps()) {
    // The end of the run: what it produced, shard by shard, so that runs
    // can be compared (tests/e2e, `switchyard train --reference`).
    for (const auto& [shard, hex] : ShardDigestsLocked()) {
      LOG(INFO) << name_ << ": after step " << next << ": digest " << shard
                << " " << hex;
    }
    if (replica_client_ != nullptr) {
      LOG(INFO) << name_ << ": " << replica_client_->Summary();
    }
  }
}

int64_t WorkerService::next_step() const {
  MutexLock lock(&mu_);
  return gate_.next_step();
}

std::optional<WorkerService::Held> WorkerService::held() const {
  MutexLock lock(&held_mu_);
  return held_published_;
}

void WorkerService::SetHeld(std::optional<Held> held) {
  held_ = held;
  MutexLock lock(&held_mu_);
  held_published_ = held;
}

uint64_t WorkerService::epoch() const {
  MutexLock lock(&mu_);
  return gate_.epoch();
}

std::vector<ShardId> WorkerService::hosted() const {
  MutexLock lock(&mu_);
  std::vector<ShardId> ids;
  for (const auto& [id, shard] : shards_) ids.push_back(id);
  return ids;
}

std::map<std::string, std::string> WorkerService::ShardDigests() const {
  MutexLock lock(&mu_);
  // Half-applied shards have no digest to compare.
  if (!SettleAllLocked().ok()) return {};
  return ShardDigestsLocked();
}

std::vector<storage::ShardSnapshot> WorkerService::SnapshotsLocked(
    bool deep) const {
  std::vector<storage::ShardSnapshot> snapshots;
  for (const auto& [index, d] : dense_) {
    snapshots.push_back(SnapshotOf(*d, *staging_pool_, deep));
  }
  for (const auto& [id, shard] : shards_) {
    snapshots.push_back(SnapshotOf(*shard, *staging_pool_, deep));
  }
  for (auto& s : snapshots) {
    s.step = gate_.next_step();
    s.epoch = gate_.epoch();
  }
  return snapshots;
}

std::vector<storage::ShardSnapshot> WorkerService::Snapshots() const {
  MutexLock lock(&mu_);
  if (!SettleAllLocked().ok()) return {};  // Half-applied: none.
  return SnapshotsLocked(/*deep=*/true);
}

std::map<std::string, std::string> WorkerService::ShardDigestsLocked() const {
  std::map<std::string, std::string> digests;
  for (const storage::ShardSnapshot& s : SnapshotsLocked(/*deep=*/false)) {
    digests[s.shard] = storage::SnapshotDigest(s);
  }
  return digests;
}

std::string WorkerService::ParameterDigest() const {
  return CombineDigests(ShardDigests());
}

std::vector<control::ShardLoad> WorkerService::TakeLoads() {
  MutexLock lock(&loads_mu_);
  std::vector<control::ShardLoad> loads;
  for (auto& [id, count] : loads_) {
    control::ShardLoad load;
    *load.mutable_shard() = ToShardRef(id);
    load.set_tokens(count.tokens);
    if (count.replicas > 1) load.set_replicas(count.replicas);
    count.tokens = 0;
    loads.push_back(load);
  }
  return loads;
}

void WorkerService::AnnotateReplication(control::Heartbeat* beat) {
  if (replica_host_ != nullptr) {
    beat->set_copy_tokens(replica_host_->TakeRowsServed());
    beat->set_copy_bytes(replica_host_->bytes());
  }
  if (replica_client_ != nullptr) {
    beat->set_offloaded_tokens(replica_client_->TakeRowsOffloaded());
  }
}

void WorkerService::SetCopyHosts(std::vector<std::string> names) {
  if (replica_client_ != nullptr)
    replica_client_->SetCopyHosts(std::move(names));
}

}  // namespace switchyard::expert_worker
