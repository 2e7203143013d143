#include "expert_worker/worker_service.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>

#include "common/digest.h"
#include "common/metrics.h"
#include "common/model_shape.h"
#include "common/random.h"
#include "common/shard_ref.h"
#include "common/thread_name.h"
#include "expert_worker/expert_init.h"

namespace switchyard::expert_worker {

using transport::Message;
using transport::MessageKind;

namespace {

constexpr uint64_t kTagDense = 3;  // 1 and 2: expert_init.cc.

// Idle request buffers (activations, outputs, gradient inputs) the worker
// keeps for reuse: a step's working set, so that no request touches fresh
// pages once the first steps have run.
constexpr size_t kPoolCachedBytes = size_t{1} << 30;

// Concatenates rows of `parts` (each (T_i, cols)) into one (sum T_i, cols),
// in a buffer from `pool`; a single part is returned as it is.
StatusOr<Tensor> ConcatRows(BufferPool& pool,
                            const std::vector<const Tensor*>& parts,
                            int64_t cols) {
  if (parts.size() == 1) return *parts.front();
  int64_t rows = 0;
  for (const Tensor* p : parts) rows += p->dim(0);
  ASSIGN_OR_RETURN(Tensor out, pool.Take(DType::kF32, {rows, cols}));
  char* dst = static_cast<char*>(out.data());
  for (const Tensor* p : parts) {
    std::memcpy(dst, p->data(), p->num_bytes());
    dst += p->num_bytes();
  }
  return out;
}

// The initial values of dense elements [range.begin, + range.count) into
// `p`. Every element is a pure function of (tensor, index): blocks of the
// range are drawn on all cores, each walking the layout tensors that
// overlap it from the one holding its first element.
void FillInitialDense(const config::SwitchyardConfig& config,
                      const DenseRange& range, float* p) {
  const std::vector<DenseTensor> layout = DenseLayout(config.model());
  constexpr int64_t kBlock = 1 << 16;
  const uint64_t seed = config.training().seed();
#pragma omp parallel for schedule(dynamic)
  for (int64_t block = 0; block < range.count; block += kBlock) {
    const int64_t first = range.begin + block;
    size_t t = static_cast<size_t>(
        std::upper_bound(
            layout.begin(), layout.end(), first,
            [](int64_t g, const DenseTensor& d) { return g < d.offset; }) -
        layout.begin() - 1);
    for (int64_t k = block; k < std::min(range.count, block + kBlock); ++k) {
      const int64_t global = range.begin + k;
      while (global >= layout[t].offset + layout[t].numel()) ++t;
      const DenseTensor& tensor = layout[t];
      const int64_t local = global - tensor.offset;
      switch (tensor.init) {
        case DenseTensor::Init::kOnes:
          p[k] = 1.0f;
          break;
        case DenseTensor::Init::kZeros:
          p[k] = 0.0f;
          break;
        case DenseTensor::Init::kNormal:
          p[k] = static_cast<float>(
              tensor.init_std *
              RandomNormal(seed, {kTagDense, t, static_cast<uint64_t>(local)}));
          break;
      }
    }
  }
}

// `t` itself, or (deep) a copy in a buffer from `pool`: the staging copy of
// a checkpoint reuses buffers instead of fresh memory, whose first touch
// costs 11.5 us per 4 KiB page on the CI VM (the demo's 16 MB per worker
// staged in 34-58 ms on fresh pages, 3-10 ms on reused ones).
Tensor Copy(BufferPool& pool, const Tensor& t, bool deep) {
  if (!deep || t.empty()) return t;
  auto copy = pool.Take(t.dtype(), t.shape());
  if (!copy.ok()) return t.Clone();
  std::memcpy(copy->data(), t.data(), t.num_bytes());
  return std::move(copy).value();
}

}  // namespace

struct WorkerService::Shard {
  ShardId id;
  ExpertParams params;
  ExpertParams grads;
  OptimizerState w1, b1, w2, b2;
  // Forward activations (x, h) of the step in progress, by (step, rank, mb).
  std::map<std::tuple<int64_t, int32_t, int32_t>, std::pair<Tensor, Tensor>>
      activations;
  struct Contribution {
    Tensor x, a, dh, dy;  // a = act(h), from the backward pass.
  };
  // Weight-gradient inputs of the step in progress, by (rank, micro-batch):
  // std::map iterates them in that order.
  std::map<std::pair<int32_t, int32_t>, Contribution> contributions;
  uint64_t tokens = 0;
};

struct WorkerService::DenseShard {
  int index = 0;
  Tensor params;  // (1, n)
  OptimizerState state;
  std::map<int32_t, Tensor> pushes;  // Gradients of the step, by rank.
};

WorkerService::WorkerService(const config::SwitchyardConfig& config,
                             std::string name)
    : config_(config),
      name_(std::move(name)),
      pool_(BufferPool::Create(kPoolCachedBytes)),
      staging_pool_(BufferPool::Create(config.checkpoint().staging_resident()
                                           ? std::numeric_limits<size_t>::max()
                                           : 0)) {}

WorkerService::~WorkerService() { Shutdown(); }

Status WorkerService::Start() {
  gemm_ = NewCpuGemm(config_.training().threads());
  ASSIGN_OR_RETURN(optimizer_, Optimizer::Create(config_.training()));
  ASSIGN_OR_RETURN(ExpertShape shape0, ExpertShardShape(config_, 0));
  ASSIGN_OR_RETURN(ExpertShape shape, ExpertShardShape(config_, 1));
  ffn0_ = std::make_unique<ExpertFfn>(shape0, gemm_.get());
  ffn_ = std::make_unique<ExpertFfn>(shape, gemm_.get());
  if (!config_.checkpoint().init_from().empty()) {
    auto reader =
        storage::SafetensorsReader::Open(config_.checkpoint().init_from());
    if (!reader.ok()) {
      return reader.status().WithContext("checkpoint.init_from");
    }
    init_ = std::move(reader).value();
  }
  thread_ = StartNamedThread("sy-worker", [this] { Run(); });
  routing_thread_ = StartNamedThread("sy-routing", [this] { RoutingLoop(); });
  if (store_ != nullptr) {
    ckpt_thread_ = StartNamedThread("sy-ckpt", [this] { CheckpointLoop(); });
    fetch_thread_ =
        StartNamedThread("sy-ckpt-fetch", [this] { FetchServeLoop(); });
  }
  return OkStatus();
}

void WorkerService::EnableCheckpoints(
    std::unique_ptr<storage::CheckpointStore> store,
    CheckpointReporter report) {
  store_ = std::move(store);
  report_ = std::move(report);
}

int WorkerService::StorageThreads() const {
  const int threads = config_.training().threads();
  return threads > 0 ? threads
                     : static_cast<int>(std::thread::hardware_concurrency());
}

void WorkerService::CheckpointLoop() {
  while (true) {
    std::vector<storage::ShardSnapshot> job;
    std::optional<control::ReplicationTask> replication;
    {
      std::unique_lock<std::mutex> lock(ckpt_mu_);
      ckpt_cv_.wait(lock, [this] {
        return ckpt_stop_ || !staged_.empty() || !replicate_.empty();
      });
      if (staged_.empty() && replicate_.empty()) return;  // Stopping.
      if (!staged_.empty()) {
        job = std::move(staged_);
        staged_.clear();
        if (uncopied_) {
          // Copied without ckpt_mu_ held, while the worker serves requests;
          // an update waits for it (WaitForStagingCopy).
          uncopied_ = false;
          copying_ = true;
          lock.unlock();
          CopyForCheckpoint(&job, "in the background");
          lock.lock();
          copying_ = false;
          ckpt_cv_.notify_all();
        }
      } else {
        replication = std::move(replicate_.front());
        replicate_.pop_front();
      }
    }
    if (replication) {
      Status s = RunReplication(*replication);
      if (!s.ok()) {
        LOG(ERROR) << name_ << ": replicating checkpoint "
                   << replication->step() << " of " << replication->source()
                   << " failed: " << s.ToString();
      }
      continue;
    }
    const int64_t step = job.front().step;
    const auto start = std::chrono::steady_clock::now();
    control::CheckpointReport report;
    report.set_step(step);
    Status s = OkStatus();
    uint64_t bytes = 0;
    const auto manifests = storage::WriteShards(*store_, job, StorageThreads());
    for (size_t i = 0; i < job.size(); ++i) {
      const storage::ShardSnapshot& snapshot = job[i];
      const auto& manifest = manifests[i];
      if (!manifest.ok()) {
        s = manifest.status();
        break;
      }
      bytes += manifest->total_bytes();
      auto id = ShardId::Parse(snapshot.shard);  // Our own names: parse.
      if (!id.ok()) {
        s = id.status();
        break;
      }
      auto* shard = report.add_shards();
      *shard->mutable_shard() = ToShardRef(*id);
      shard->set_digest(manifest->digest());
      shard->set_bytes(manifest->total_bytes());
    }
    if (s.ok() && report_) s = report_(report);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    auto& metrics = MetricsRegistry::Global();
    if (s.ok()) {
      metrics.GetCounter("switchyard_worker_checkpoints_written_total")
          ->Increment();
      metrics.GetCounter("switchyard_worker_checkpoint_bytes_total")
          ->Increment(bytes);
      metrics.GetGauge("switchyard_worker_checkpoint_last_step")
          ->Set(static_cast<double>(step));
      metrics.GetGauge("switchyard_worker_checkpoint_last_write_seconds")
          ->Set(seconds);
      LOG(INFO) << name_ << ": checkpoint " << step << " written ("
                << job.size() << " shards, " << bytes << " bytes in " << seconds
                << " s) and reported";
    } else {
      // Training goes on; the coordinator never commits this step, and the
      // previous committed checkpoint stays.
      metrics.GetCounter("switchyard_worker_checkpoints_failed_total")
          ->Increment();
      LOG(ERROR) << name_ << ": checkpoint " << step
                 << " failed: " << s.ToString();
    }
    job.clear();  // The staging buffers go back before the next can stage.
    {
      std::lock_guard<std::mutex> lock(ckpt_mu_);
      ckpt_busy_ = !staged_.empty();
    }
    ckpt_cv_.notify_all();
  }
}

void WorkerService::FetchServeLoop() {
  // The last shard read: a fetch asks for its tensors one by one.
  std::optional<storage::ShardSnapshot> cached;
  while (true) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(fetch_mu_);
      fetch_cv_.wait(lock, [this] { return fetch_stop_ || !fetches_.empty(); });
      if (fetch_stop_) break;
      task = std::move(fetches_.front());
      fetches_.pop_front();
    }
    const transport::WireHeader& h = task.request.header;
    const std::string shard =
        h.expert < 0 ? ShardId::Dense(h.shard).ToString()
                     : ShardId::Expert(h.layer, h.expert, h.shard).ToString();
    if (!cached || cached->step != h.step || cached->shard != shard) {
      cached.reset();
      auto read = store_->ReadShard(h.step, shard);  // Verifies every chunk.
      if (!read.ok()) {
        task.reply(transport::ErrorResponse(
            h, read.status().WithContext(name_ + " serving a fetch")));
        continue;
      }
      cached = std::move(read).value();
    }
    if (h.micro_batch < 0 ||
        h.micro_batch >= static_cast<int32_t>(cached->tensors.size()) ||
        cached->tensors[h.micro_batch].tensor.empty()) {
      task.reply(transport::ErrorResponse(
          h, NotFoundError("checkpoint of " + shard + " at step " +
                           std::to_string(h.step) + " has no tensor " +
                           std::to_string(h.micro_batch))));
      continue;
    }
    const Tensor& t = cached->tensors[h.micro_batch].tensor;
    task.reply(
        transport::TensorResponse(h, t.Reshape({1, t.num_elements()}).value()));
  }
  // Whatever is left is answered, never dropped.
  std::lock_guard<std::mutex> lock(fetch_mu_);
  for (Task& t : fetches_) {
    t.reply(transport::ErrorResponse(
        t.request.header, UnavailableError(name_ + " is shutting down")));
  }
  fetches_.clear();
}

void WorkerService::Replicate(control::ReplicationTask task) {
  if (store_ == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(ckpt_mu_);
    replicate_.push_back(std::move(task));
  }
  ckpt_cv_.notify_all();
}

Status WorkerService::RunReplication(const control::ReplicationTask& task) {
  if (peers_ == nullptr) return FailedPreconditionError("no data plane");
  const auto start = std::chrono::steady_clock::now();
  control::CheckpointReport report;
  report.set_step(task.step());
  report.set_replica(true);
  uint64_t bytes = 0;
  for (const auto& ref : task.shards()) {
    // Tensors shaped like the shard's, from a zero-filled one.
    storage::ShardSnapshot like;
    std::unique_ptr<Shard> expert;
    std::unique_ptr<DenseShard> dense;
    if (ref.kind() == control::DENSE) {
      ASSIGN_OR_RETURN(dense, NewDenseShard(ref.shard(), /*initialise=*/false));
      like = SnapshotOf(*dense, /*deep=*/false);
    } else {
      ASSIGN_OR_RETURN(expert,
                       NewShard(FromShardRef(ref), /*initialise=*/false));
      like = SnapshotOf(*expert, /*deep=*/false);
    }
    ASSIGN_OR_RETURN(storage::ShardSnapshot copy,
                     FetchShard(task.source_address(), task.step(), like));
    ASSIGN_OR_RETURN(auto manifest, store_->WriteShard(copy));
    auto* shard = report.add_shards();
    *shard->mutable_shard() = ref;
    shard->set_digest(manifest.digest());
    shard->set_bytes(manifest.total_bytes());
    bytes += manifest.total_bytes();
  }
  if (report_) RETURN_IF_ERROR(report_(report));
  LOG(INFO) << name_ << ": replicated " << task.shards_size()
            << " shards of checkpoint " << task.step() << " from "
            << task.source() << " (" << bytes << " bytes in "
            << std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                             start)
                   .count()
            << " s)";
  return OkStatus();
}

void WorkerService::WaitCheckpointsWritten() {
  std::unique_lock<std::mutex> lock(ckpt_mu_);
  ckpt_cv_.wait(lock, [this] { return !ckpt_busy_; });
}

void WorkerService::DropCheckpointsBefore(int64_t step) {
  if (store_ == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(ckpt_mu_);
    if (step <= dropped_before_) return;
    dropped_before_ = step;
  }
  Status s = store_->DropSteps(0, step);
  if (!s.ok()) {
    LOG(WARNING) << name_ << ": cannot drop checkpoints before step " << step
                 << ": " << s.ToString();
  }
}

void WorkerService::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    if (stop_) return;
    stop_ = true;
  }
  {
    // A table being applied is finished first.
    std::lock_guard<std::mutex> lock(routing_mu_);
    routing_stop_ = true;
  }
  routing_cv_.notify_all();
  if (routing_thread_.joinable()) routing_thread_.join();
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  {
    // A checkpoint being written is finished (it may be committed).
    std::lock_guard<std::mutex> lock(ckpt_mu_);
    ckpt_stop_ = true;
  }
  ckpt_cv_.notify_all();
  if (ckpt_thread_.joinable()) ckpt_thread_.join();
  {
    std::lock_guard<std::mutex> lock(fetch_mu_);
    fetch_stop_ = true;
  }
  fetch_cv_.notify_all();
  if (fetch_thread_.joinable()) fetch_thread_.join();
  // Whatever was queued or waiting is answered, never dropped silently.
  std::vector<Task> unanswered;
  {
    std::lock_guard<std::mutex> state(mu_);
    std::lock_guard<std::mutex> lock(queue_mu_);
    unanswered.assign(std::make_move_iterator(queue_.begin()),
                      std::make_move_iterator(queue_.end()));
    for (Task& t : waiting_) unanswered.push_back(std::move(t));
    queue_.clear();
    waiting_.clear();
  }
  for (Task& t : unanswered) {
    t.reply(transport::ErrorResponse(
        t.request.header, UnavailableError(name_ + " is shutting down")));
  }
}

StatusOr<std::unique_ptr<WorkerService::Shard>> WorkerService::NewShard(
    const ShardId& id, bool initialise) const {
  const ExpertFfn& ffn = id.shard == 0 ? *ffn0_ : *ffn_;
  auto shard = std::make_unique<Shard>();
  shard->id = id;
  if (!initialise) {
    ASSIGN_OR_RETURN(shard->params, ExpertParams::Zeros(ffn.shape()));
  } else {
    ASSIGN_OR_RETURN(shard->params, InitialExpertParams(config_, id));
  }
  if (init_ && initialise) {
    RETURN_IF_ERROR(InitExpertFrom(id, &shard->params));
    if (ffn.shape().compute_dtype == DType::kBF16) {
      RETURN_IF_ERROR(shard->params.RefreshBf16());
    }
  }
  ASSIGN_OR_RETURN(shard->grads, ExpertParams::Zeros(ffn.shape()));
  ASSIGN_OR_RETURN(shard->w1, optimizer_->NewState(shard->params.w1));
  ASSIGN_OR_RETURN(shard->w2, optimizer_->NewState(shard->params.w2));
  if (!shard->params.b1.empty()) {
    ASSIGN_OR_RETURN(shard->b1, optimizer_->NewState(shard->params.b1));
  }
  if (!shard->params.b2.empty()) {
    ASSIGN_OR_RETURN(shard->b2, optimizer_->NewState(shard->params.b2));
  }
  return shard;
}

Status WorkerService::InitExpertFrom(const ShardId& id,
                                     ExpertParams* params) const {
  const auto& m = config_.model();
  const int layer = TransformerLayerOfMoe(m, id.layer);
  const std::string expert = ExpertTensorPrefix(layer, id.expert);
  const std::string dense = "layers." + std::to_string(layer) + ".ffn.";
  // The expert's own tensors, or the dense FFN it is upcycled from.
  const std::string from = init_->Has(expert + "w1")  ? expert
                           : init_->Has(dense + "w1") ? dense
                                                      : "";
  if (from.empty()) return OkStatus();  // Not in the files: random init.
  const int64_t d = m.d_model(), F = m.d_ff();
  const int64_t f = params->w2.dim(0), s0 = id.shard * f;
  const int64_t g = params->w1.dim(1) / f;
  auto load = [&](const std::string& name,
                  std::vector<int64_t> shape) -> StatusOr<Tensor> {
    ASSIGN_OR_RETURN(Tensor t, init_->Read(from + name));
    if (t.shape() != shape) {
      return FailedPreconditionError(
          "checkpoint.init_from: " + from + name + " is " + t.DebugString() +
          ", the model needs " +
          Tensor::Zeros(DType::kF32, shape)->DebugString());
    }
    return t;
  };
  // W1 (d, g*F) [gate | up]: this shard's columns of each block.
  ASSIGN_OR_RETURN(Tensor w1, load("w1", {d, g * F}));
  for (int64_t r = 0; r < d; ++r) {
    for (int64_t gate = 0; gate < g; ++gate) {
      std::memcpy(params->w1.f32() + r * g * f + gate * f,
                  w1.f32() + r * g * F + gate * F + s0, f * sizeof(float));
    }
  }
  ASSIGN_OR_RETURN(Tensor w2, load("w2", {F, d}));
  std::memcpy(params->w2.f32(), w2.f32() + s0 * d, f * d * sizeof(float));
  if (!params->b1.empty() && init_->Has(from + "b1")) {
    ASSIGN_OR_RETURN(Tensor b1, load("b1", {g * F}));
    for (int64_t gate = 0; gate < g; ++gate) {
      std::memcpy(params->b1.f32() + gate * f, b1.f32() + gate * F + s0,
                  f * sizeof(float));
    }
  }
  if (!params->b2.empty() && init_->Has(from + "b2")) {
    ASSIGN_OR_RETURN(Tensor b2, load("b2", {d}));
    std::memcpy(params->b2.f32(), b2.f32(), d * sizeof(float));
  }
  return OkStatus();
}

Status WorkerService::InitDenseFrom(int index, Tensor* params) const {
  const auto& m = config_.model();
  const DenseRange range = DenseShardRange(m, index);
  for (const DenseTensor& t : DenseLayout(m)) {
    const int64_t begin = std::max(t.offset, range.begin);
    const int64_t end =
        std::min(t.offset + t.numel(), range.begin + range.count);
    if (begin >= end || !init_->Has(t.name)) continue;
    ASSIGN_OR_RETURN(Tensor v, init_->Read(t.name));
    if (v.num_elements() != t.numel()) {
      return FailedPreconditionError(
          "checkpoint.init_from: " + t.name + " is " + v.DebugString() +
          ", the model needs " + std::to_string(t.rows) + " x " +
          std::to_string(t.cols));
    }
    std::memcpy(params->f32() + (begin - range.begin),
                v.f32() + (begin - t.offset), (end - begin) * sizeof(float));
  }
  return OkStatus();
}

StatusOr<std::unique_ptr<WorkerService::DenseShard>>
WorkerService::NewDenseShard(int index, bool initialise) const {
  const DenseRange range = DenseShardRange(config_.model(), index);
  auto shard = std::make_unique<DenseShard>();
  shard->index = index;
  ASSIGN_OR_RETURN(shard->params, Tensor::Zeros(DType::kF32, {1, range.count}));
  if (initialise) {
    FillInitialDense(config_, range, shard->params.f32());
    if (init_) RETURN_IF_ERROR(InitDenseFrom(index, &shard->params));
  }
  ASSIGN_OR_RETURN(shard->state, optimizer_->NewState(shard->params));
  return shard;
}

Status WorkerService::ApplyRouting(const control::RoutingTable& routing) {
  std::lock_guard<std::mutex> applying(apply_mu_);
  int self = -1;
  for (int i = 0; i < routing.workers_size(); ++i) {
    if (routing.workers(i).name() == name_) self = i;
  }
  std::set<ShardId> wanted;
  std::set<int> wanted_dense;
  for (const auto& e : routing.entries()) {
    if (e.worker() != self || self < 0) continue;
    if (e.shard().kind() == control::EXPERT) {
      wanted.insert(FromShardRef(e.shard()));
    } else if (e.shard().kind() == control::DENSE) {
      wanted_dense.insert(e.shard().shard());
    }
  }
  // What is hosted now; only this function (under apply_mu_) changes it.
  std::set<ShardId> have;
  std::set<int> have_dense;
  int64_t next_step = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, shard] : shards_) have.insert(id);
    for (const auto& [index, shard] : dense_) have_dense.insert(index);
    next_step = next_step_;
  }
  // A resumed run restores what it hosts before its first update: at start,
  // and again when placement hands it more shards before training begins
  // (the shards it has are then still exactly the checkpoint's, so only the
  // new ones are loaded).
  const int64_t resume = routing.resume_step();
  bool adopted = false;
  for (const ShardId& id : wanted) adopted |= !have.count(id);
  for (int index : wanted_dense) adopted |= !have_dense.count(index);
  const bool restore =
      resume > 0 && (next_step == 0 || (adopted && next_step == resume));
  const bool reload_all = restore && next_step != resume;
  if (adopted && next_step > 0 && !restore) {
    // NOTE: re-placing a lost worker's shards mid-run from the last
    // committed checkpoint, with a rollback, belongs to the failures work
    // (DESIGN.md, "Failures"); until then they start from initial values.
    LOG(WARNING) << name_ << ": adopting shards at step " << next_step
                 << " with initial values";
  }
  // New shards are made (and restored) outside mu_: initialising or reading
  // gigabytes takes seconds, and requests of the current epoch go on.
  // Restored ones start zero-filled: the checkpoint overwrites every tensor
  // (Restore checks each against the model's).
  std::map<ShardId, std::unique_ptr<Shard>> made;
  std::map<int, std::unique_ptr<DenseShard>> made_dense;
  std::vector<storage::ShardSnapshot> to_restore;
  for (int index : wanted_dense) {
    if (have_dense.count(index) && !reload_all) continue;
    ASSIGN_OR_RETURN(made_dense[index], NewDenseShard(index, !restore));
    to_restore.push_back(SnapshotOf(*made_dense[index], /*deep=*/false));
  }
  for (const ShardId& id : wanted) {
    if (have.count(id) && !reload_all) continue;
    ASSIGN_OR_RETURN(made[id], NewShard(id, !restore));
    to_restore.push_back(SnapshotOf(*made[id], /*deep=*/false));
  }
  if (restore) {
    // Until the shards are restored the worker stays at its old epoch, so
    // requests of the new one are refused as not ready (ABORTED), never
    // served from initial values; a later table retries.
    RETURN_IF_ERROR(Restore(routing, std::move(to_restore)));
    if (ffn_->shape().compute_dtype == DType::kBF16) {
      for (auto& [id, shard] : made) {
        RETURN_IF_ERROR(shard->params.RefreshBf16());
      }
    }
  }
  if (store_ != nullptr && config_.checkpoint().every() > 0 &&
      config_.checkpoint().staging_resident()) {
    // The staging buffers of the new shards, touched now (all held at
    // once, so that none reuses another's) rather than in the first
    // checkpoint's step.
    std::vector<storage::ShardSnapshot> warm;
    for (auto& [index, shard] : made_dense) {
      warm.push_back(SnapshotOf(*shard, /*deep=*/true));
    }
    for (auto& [id, shard] : made) {
      warm.push_back(SnapshotOf(*shard, /*deep=*/true));
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = dense_.begin(); it != dense_.end();) {
    it = wanted_dense.count(it->first) ? std::next(it) : dense_.erase(it);
  }
  for (auto it = shards_.begin(); it != shards_.end();) {
    it = wanted.count(it->first) ? std::next(it) : shards_.erase(it);
  }
  for (auto& [index, shard] : made_dense) dense_[index] = std::move(shard);
  for (auto& [id, shard] : made) shards_[id] = std::move(shard);
  if (restore) next_step_ = resume;
  epoch_ = routing.epoch();
  return OkStatus();
}

void WorkerService::OfferRouting(const control::RoutingTable& routing) {
  {
    std::lock_guard<std::mutex> lock(routing_mu_);
    if (offered_.has_value() && offered_->epoch() > routing.epoch()) return;
    offered_ = routing;
  }
  routing_cv_.notify_all();
}

void WorkerService::RoutingLoop() {
  while (true) {
    control::RoutingTable routing;
    {
      std::unique_lock<std::mutex> lock(routing_mu_);
      routing_cv_.wait(
          lock, [this] { return routing_stop_ || offered_.has_value(); });
      if (routing_stop_) return;
      routing = std::move(*offered_);
      offered_.reset();
    }
    Status s = ApplyRouting(routing);
    if (!s.ok()) {
      // The worker stays at its previous epoch (requests of the new one are
      // refused as not ready) and tries again with the next table.
      LOG(WARNING) << name_ << ": cannot adopt epoch " << routing.epoch()
                   << " yet (retried with the next routing table): "
                   << s.ToString();
    }
  }
}

void WorkerService::Handle(Message request, transport::Reply reply) {
  if (request.header.kind ==
      static_cast<uint8_t>(MessageKind::kCheckpointFetch)) {
    std::lock_guard<std::mutex> lock(fetch_mu_);
    if (store_ != nullptr && !fetch_stop_) {
      fetches_.push_back({std::move(request), std::move(reply)});
      fetch_cv_.notify_one();
      return;
    }
    reply(transport::ErrorResponse(
        request.header,
        FailedPreconditionError(name_ + " keeps no checkpoints")));
    return;
  }
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    if (!stop_) {
      queue_.push_back({std::move(request), std::move(reply)});
      cv_.notify_one();
      return;
    }
  }
  reply(transport::ErrorResponse(
      request.header, UnavailableError(name_ + " is shutting down")));
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
  while (true) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(queue_mu_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      task = std::move(queue_.front());
      queue_.pop_front();
      queue_depth->Set(static_cast<double>(queue_.size()));
    }
    std::lock_guard<std::mutex> state(mu_);
    requests->Increment();
    if (task.request.header.kind ==
        static_cast<uint8_t>(MessageKind::kExpertForward)) {
      tokens->Increment(static_cast<uint64_t>(task.request.header.rows));
    }
    // Count refusals by wrapping the reply.
    transport::Reply reply = std::move(task.reply);
    task.reply = [reply = std::move(reply), errors](Message response) {
      if (response.header.status_code != 0) errors->Increment();
      reply(std::move(response));
    };
    const auto start = std::chrono::steady_clock::now();
    Process(std::move(task));
    compute_ms->Observe(std::chrono::duration<double, std::milli>(
                            std::chrono::steady_clock::now() - start)
                            .count());
    waiting->Set(static_cast<double>(waiting_.size()));
  }
}

void WorkerService::Process(Task task) {
  const transport::WireHeader& h = task.request.header;
  auto fail = [&](const Status& s) {
    task.reply(transport::ErrorResponse(h, s));
  };
  if (h.epoch != epoch_) {
    if (h.epoch < epoch_) {
      fail(FailedPreconditionError(
          "stale epoch " + std::to_string(h.epoch) + ": " + name_ +
          " is at epoch " + std::to_string(epoch_) + "; refresh the routing"));
    } else {
      // ABORTED: nothing done, the sender retries (transport::SendAll).
      fail(AbortedError(name_ + " has not seen epoch " +
                        std::to_string(h.epoch) + " yet (at " +
                        std::to_string(epoch_) + "); retry"));
    }
    return;
  }
  const auto kind = static_cast<MessageKind>(h.kind);
  if (kind == MessageKind::kEcho) {
    fail(InvalidArgumentError("a worker does not serve " +
                              transport::DescribeHeader(h)));
    return;
  }
  if (h.step < next_step_) {
    fail(FailedPreconditionError("step " + std::to_string(h.step) +
                                 " is already applied (next step " +
                                 std::to_string(next_step_) + ")"));
    return;
  }
  if (h.step > next_step_) {
    if (h.step == next_step_ + 1) {
      waiting_.push_back(std::move(task));  // Runs once update t is applied.
    } else {
      fail(FailedPreconditionError("step " + std::to_string(h.step) +
                                   " is ahead of step " +
                                   std::to_string(next_step_)));
    }
    return;
  }
  if (h.trainer_rank < 0 || h.trainer_rank >= config_.cluster().trainers()) {
    fail(InvalidArgumentError(
        "trainer rank " + std::to_string(h.trainer_rank) + " is outside [0, " +
        std::to_string(config_.cluster().trainers()) + ")"));
    return;
  }
  if (kind == MessageKind::kStepDone) {
    Status s = StepDone(task.request);
    task.reply(s.ok() ? transport::TensorResponse(h, Tensor())
                      : transport::ErrorResponse(h, s));
    return;
  }
  if (kind == MessageKind::kDensePull || kind == MessageKind::kDensePush) {
    Tensor out;
    Status s = Dense(task.request, &out);
    task.reply(s.ok() ? transport::TensorResponse(h, std::move(out))
                      : transport::ErrorResponse(h, s));
    return;
  }
  const ShardId id = ShardId::Expert(h.layer, h.expert, h.shard);
  auto it = shards_.find(id);
  if (it == shards_.end()) {
    fail(NotFoundError("shard " + id.ToString() + " is not hosted by " + name_ +
                       " at epoch " + std::to_string(epoch_)));
    return;
  }
  const Tensor& payload = task.request.payload;
  if (payload.empty() || payload.rank() != 2 ||
      payload.dim(1) != config_.model().d_model()) {
    fail(InvalidArgumentError(
        "payload " + (payload.empty() ? "<none>" : payload.DebugString()) +
        " is not (tokens, d_model = " +
        std::to_string(config_.model().d_model()) + ")"));
    return;
  }
  Tensor out;
  Status s = kind == MessageKind::kExpertBackward
                 ? Backward(task.request, it->second.get(), &out)
                 : Forward(task.request, it->second.get(), &out);
  // Answer in the dtype the request came in.
  StatusOr<Tensor> reply =
      s.ok() ? pool_->Converted(out, payload.dtype()) : StatusOr<Tensor>(s);
  if (!reply.ok()) {
    fail(reply.status());
    return;
  }
  task.reply(transport::TensorResponse(h, *std::move(reply)));
}

namespace {

// Expert dropout's multipliers for one request's activations (T, f): unit
// (row, column) of expert shard (layer, expert, shard) is dropped with
// probability model.expert_dropout, from (seed, step, rank, micro-batch,
// layer, expert, row, global column) so that a forward and its backward,
// and two runs, agree. Empty when there is no dropout.
std::vector<float> ExpertDropoutKeep(const config::SwitchyardConfig& config,
                                     const transport::WireHeader& h,
                                     int64_t tokens, int64_t f) {
  const double rate = config.model().expert_dropout();
  if (rate <= 0) return {};
  constexpr uint64_t kTagExpertDropout = 41;
  const float scale = static_cast<float>(1.0 / (1.0 - rate));
  std::vector<float> keep(static_cast<size_t>(tokens * f));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < f; ++c) {
      const double u = RandomUniform(
          config.training().seed(),
          {kTagExpertDropout, static_cast<uint64_t>(h.step),
           static_cast<uint64_t>(h.trainer_rank),
           static_cast<uint64_t>(h.micro_batch), static_cast<uint64_t>(h.layer),
           static_cast<uint64_t>(h.expert), static_cast<uint64_t>(t),
           static_cast<uint64_t>(h.shard * f + c)});
      keep[t * f + c] = u < rate ? 0.0f : scale;
    }
  }
  return keep;
}

}  // namespace

Status WorkerService::Forward(const Message& request, Shard* shard, Tensor* y) {
  const auto& h = request.header;
  const bool train =
      h.kind == static_cast<uint8_t>(MessageKind::kExpertForward);
  const auto key = std::make_tuple(h.step, h.trainer_rank, h.micro_batch);
  if (train && shard->activations.count(key)) {
    return AlreadyExistsError("duplicate forward for " +
                              transport::DescribeHeader(h));
  }
  ASSIGN_OR_RETURN(Tensor x, pool_->Converted(request.payload, DType::kF32));
  const ExpertFfn& ffn = shard->id.shard == 0 ? *ffn0_ : *ffn_;
  const int64_t tokens = x.dim(0);
  ASSIGN_OR_RETURN(
      Tensor hidden,
      pool_->Take(DType::kF32,
                  {tokens, ffn.shape().gates() * ffn.shape().d_ff_shard}));
  ASSIGN_OR_RETURN(*y, pool_->Take(DType::kF32, {tokens, x.dim(1)}));
  const std::vector<float> keep =
      train ? ExpertDropoutKeep(config_, h, tokens, ffn.shape().d_ff_shard)
            : std::vector<float>();
  RETURN_IF_ERROR(ffn.Forward(
      shard->params, x, keep.empty() ? nullptr : keep.data(), &hidden, y));
  if (!train) return OkStatus();  // Evaluation keeps nothing.
  shard->activations[key] = {std::move(x), std::move(hidden)};
  shard->tokens += tokens;
  return OkStatus();
}

Status WorkerService::Backward(const Message& request, Shard* shard,
                               Tensor* dx) {
  const auto& h = request.header;
  const auto key = std::make_tuple(h.step, h.trainer_rank, h.micro_batch);
  auto it = shard->activations.find(key);
  if (it == shard->activations.end()) {
    return FailedPreconditionError("backward without a forward: " +
                                   transport::DescribeHeader(h));
  }
  ASSIGN_OR_RETURN(Tensor dy, pool_->Converted(request.payload, DType::kF32));
  const Tensor& x = it->second.first;
  const Tensor& hidden = it->second.second;
  if (dy.dim(0) != x.dim(0)) {
    return InvalidArgumentError(
        "backward carries " + std::to_string(dy.dim(0)) +
        " tokens, its forward had " + std::to_string(x.dim(0)));
  }
  const ExpertFfn& ffn = shard->id.shard == 0 ? *ffn0_ : *ffn_;
  ASSIGN_OR_RETURN(Tensor dh, pool_->Take(DType::kF32, hidden.shape()));
  ASSIGN_OR_RETURN(
      Tensor a, pool_->Take(DType::kF32, {x.dim(0), ffn.shape().d_ff_shard}));
  ASSIGN_OR_RETURN(*dx, pool_->Take(DType::kF32, x.shape()));
  const std::vector<float> keep =
      ExpertDropoutKeep(config_, h, x.dim(0), ffn.shape().d_ff_shard);
  RETURN_IF_ERROR(ffn.BackwardInput(shard->params, hidden, dy,
                                    keep.empty() ? nullptr : keep.data(), &dh,
                                    &a, dx));
  shard->contributions[{h.trainer_rank, h.micro_batch}] = {
      x, std::move(a), std::move(dh), std::move(dy)};
  shard->activations.erase(it);
  return OkStatus();
}

Status WorkerService::Dense(const Message& request, Tensor* out) {
  const auto& h = request.header;
  auto it = dense_.find(h.shard);
  if (it == dense_.end()) {
    return NotFoundError("dense shard D" + std::to_string(h.shard) +
                         " is not hosted by " + name_ + " at epoch " +
                         std::to_string(epoch_));
  }
  DenseShard& shard = *it->second;
  if (static_cast<MessageKind>(h.kind) == MessageKind::kDensePull) {
    *out = shard.params.Clone();
    return OkStatus();
  }
  const Tensor& grad = request.payload;
  if (grad.empty() || grad.dtype() != DType::kF32 ||
      grad.shape() != shard.params.shape()) {
    return InvalidArgumentError("dense gradient " +
                                (grad.empty() ? "<none>" : grad.DebugString()) +
                                " for D" + std::to_string(h.shard) +
                                " must be " + shard.params.DebugString());
  }
  if (!shard.pushes.emplace(h.trainer_rank, grad).second) {
    return AlreadyExistsError("duplicate dense push: " +
                              transport::DescribeHeader(h));
  }
  return OkStatus();
}

Status WorkerService::StepDone(const Message& request) {
  const auto& h = request.header;
  auto& done = step_done_[h.step];
  done.insert(h.trainer_rank);
  if (static_cast<int>(done.size()) < config_.cluster().trainers()) {
    return OkStatus();
  }
  step_done_.erase(h.step);
  RETURN_IF_ERROR(ApplyUpdate(h.step));
  // Requests for the next step that arrived early run now, in arrival order.
  std::vector<Task> ready = std::move(waiting_);
  waiting_.clear();
  std::lock_guard<std::mutex> lock(queue_mu_);  // Order: mu_, then queue_mu_.
  for (auto it = ready.rbegin(); it != ready.rend(); ++it) {
    queue_.push_front(std::move(*it));
  }
  return OkStatus();
}

Status WorkerService::WaitForStagingCopy(int64_t step) {
  if (store_ == nullptr) return OkStatus();
  const auto start = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(ckpt_mu_);
  if (uncopied_) {
    CopyForCheckpoint(&staged_, "by the next update");
    uncopied_ = false;
  }
  // A copy is a memcpy of the shards (milliseconds); the deadline is only
  // there so that nothing waits forever.
  if (!ckpt_cv_.wait_for(lock, std::chrono::seconds(60),
                         [this] { return !copying_; })) {
    return InternalError(name_ + ": update " + std::to_string(step) +
                         " waited 60 s for a checkpoint's staging copy");
  }
  const double ms = std::chrono::duration<double, std::milli>(
                        std::chrono::steady_clock::now() - start)
                        .count();
  if (ms > 1) {
    LOG(INFO) << name_ << ": update " << step << " waited " << ms
              << " ms for a checkpoint's staging copy";
  }
  return OkStatus();
}

void WorkerService::CopyForCheckpoint(std::vector<storage::ShardSnapshot>* job,
                                      const char* how) const {
  const auto start = std::chrono::steady_clock::now();
  for (storage::ShardSnapshot& s : *job) {
    for (auto& t : s.tensors) {
      t.tensor = Copy(*staging_pool_, t.tensor, /*deep=*/true);
    }
  }
  LOG(INFO) << name_ << ": checkpoint "
            << (job->empty() ? -1 : job->front().step) << " staged in "
            << std::chrono::duration<double, std::milli>(
                   std::chrono::steady_clock::now() - start)
                   .count()
            << " ms " << how;
}

Status WorkerService::ApplyUpdate(int64_t step) {
  RETURN_IF_ERROR(WaitForStagingCopy(step));
  for (auto& [id, shard] : shards_) {
    shard->activations.clear();  // Forwards never followed by a backward.
    if (shard->contributions.empty()) continue;  // No tokens: no update.
    const ExpertFfn& ffn = id.shard == 0 ? *ffn0_ : *ffn_;
    std::vector<const Tensor*> xs, as, dhs, dys;
    for (const auto& [key, c] : shard->contributions) {
      xs.push_back(&c.x);
      as.push_back(&c.a);
      dhs.push_back(&c.dh);
      dys.push_back(&c.dy);
    }
    const int64_t gf = ffn.shape().gates() * ffn.shape().d_ff_shard;
    const int64_t d = ffn.shape().d_model;
    // One GEMM over every contribution, in (rank, micro-batch) order; it
    // overwrites the previous step's gradient.
    const int64_t f = ffn.shape().d_ff_shard;
    ASSIGN_OR_RETURN(Tensor x, ConcatRows(*pool_, xs, d));
    ASSIGN_OR_RETURN(Tensor a, ConcatRows(*pool_, as, f));
    ASSIGN_OR_RETURN(Tensor dh, ConcatRows(*pool_, dhs, gf));
    ASSIGN_OR_RETURN(Tensor dy, ConcatRows(*pool_, dys, d));
    RETURN_IF_ERROR(ffn.ComputeGrads(x, a, dh, dy, &shard->grads));
    shard->contributions.clear();
    RETURN_IF_ERROR(optimizer_->Apply(step, shard->grads.w1, &shard->params.w1,
                                      &shard->w1));
    RETURN_IF_ERROR(optimizer_->Apply(step, shard->grads.w2, &shard->params.w2,
                                      &shard->w2));
    if (!shard->params.b1.empty()) {
      RETURN_IF_ERROR(optimizer_->Apply(step, shard->grads.b1,
                                        &shard->params.b1, &shard->b1));
    }
    if (!shard->params.b2.empty()) {
      RETURN_IF_ERROR(optimizer_->Apply(step, shard->grads.b2,
                                        &shard->params.b2, &shard->b2));
    }
    if (ffn.shape().compute_dtype == DType::kBF16) {
      RETURN_IF_ERROR(shard->params.RefreshBf16());  // Weights changed.
    }
  }
  for (auto& [index, shard] : dense_) {
    if (shard->pushes.empty()) continue;
    // Sum in rank order (std::map), whatever order the pushes came in.
    Tensor sum = shard->pushes.begin()->second.Clone();
    for (auto it = std::next(shard->pushes.begin()); it != shard->pushes.end();
         ++it) {
      float* acc = sum.f32();
      const float* g = it->second.f32();
      for (int64_t i = 0; i < sum.num_elements(); ++i) acc[i] += g[i];
    }
    shard->pushes.clear();
    RETURN_IF_ERROR(
        optimizer_->Apply(step, sum, &shard->params, &shard->state));
  }
  next_step_ = step + 1;
  // Checkpoints every `every` steps, and where the run ends or stops.
  const int every = config_.checkpoint().every();
  const auto& tr = config_.training();
  if (store_ != nullptr && every > 0 &&
      (next_step_ % every == 0 || next_step_ == tr.steps() ||
       next_step_ == tr.stop_at_step())) {
    std::unique_lock<std::mutex> lock(ckpt_mu_);
    const bool run_ends =
        next_step_ == tr.steps() || next_step_ == tr.stop_at_step();
    if (ckpt_busy_ && !run_ends) {
      MetricsRegistry::Global()
          .GetCounter("switchyard_worker_checkpoints_skipped_total")
          ->Increment();
      LOG(WARNING) << name_ << ": checkpoint " << next_step_
                   << " skipped: the previous one is still being written";
    } else {
      // References now; the copy is made while the next step's requests
      // are served (staged_). The run's last checkpoint is never skipped:
      // with a write in flight it is queued behind it, without waiting
      // (this update answers the trainers' StepDone). The checkpoint
      // thread copies it once that write has returned its staging
      // buffers; no update follows the run's end to change the shards
      // before (one that did would copy it first, WaitForStagingCopy).
      if (ckpt_busy_) {
        LOG(INFO) << name_ << ": checkpoint " << next_step_
                  << " (the run's end) is queued behind the previous write";
      }
      if (!staged_.empty()) {
        LOG(WARNING) << name_ << ": checkpoint " << staged_.front().step
                     << " was not begun; the run's last, " << next_step_
                     << ", replaces it";
        staged_.clear();
      }
      staged_ = SnapshotsLocked(/*deep=*/false);
      uncopied_ = true;
      ckpt_busy_ = true;
      ckpt_cv_.notify_all();
    }
  }
  if (next_step_ == config_.training().steps()) {
    // The end of the run: what it produced, shard by shard, so that runs
    // can be compared (tests/e2e, `switchyard train --reference`).
    for (const auto& [shard, hex] : ShardDigestsLocked()) {
      LOG(INFO) << name_ << ": after step " << next_step_ << ": digest "
                << shard << " " << hex;
    }
  }
  return OkStatus();
}

int64_t WorkerService::next_step() const {
  std::lock_guard<std::mutex> lock(mu_);
  return next_step_;
}

uint64_t WorkerService::epoch() const {
  std::lock_guard<std::mutex> lock(mu_);
  return epoch_;
}

std::vector<ShardId> WorkerService::hosted() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<ShardId> ids;
  for (const auto& [id, shard] : shards_) ids.push_back(id);
  return ids;
}

std::map<std::string, std::string> WorkerService::ShardDigests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ShardDigestsLocked();
}

namespace {

void AddState(BufferPool& pool, storage::ShardSnapshot* s,
              const std::string& prefix, const OptimizerState& st, bool deep) {
  s->tensors.push_back({prefix + "m", Copy(pool, st.m, deep)});
  s->tensors.push_back({prefix + "v", Copy(pool, st.v, deep)});
  s->tensors.push_back({prefix + "row", Copy(pool, st.row, deep)});
  s->tensors.push_back({prefix + "col", Copy(pool, st.col, deep)});
}

}  // namespace

storage::ShardSnapshot WorkerService::SnapshotOf(const DenseShard& d,
                                                 bool deep) const {
  storage::ShardSnapshot s;
  s.shard = "D" + std::to_string(d.index);
  s.tensors.push_back({"params", Copy(*staging_pool_, d.params, deep)});
  AddState(*staging_pool_, &s, "opt.", d.state, deep);
  return s;
}

storage::ShardSnapshot WorkerService::SnapshotOf(const Shard& shard,
                                                 bool deep) const {
  storage::ShardSnapshot s;
  s.shard = shard.id.ToString();
  BufferPool& pool = *staging_pool_;
  s.tensors.push_back({"w1", Copy(pool, shard.params.w1, deep)});
  s.tensors.push_back({"b1", Copy(pool, shard.params.b1, deep)});
  s.tensors.push_back({"w2", Copy(pool, shard.params.w2, deep)});
  s.tensors.push_back({"b2", Copy(pool, shard.params.b2, deep)});
  AddState(pool, &s, "opt.w1.", shard.w1, deep);
  AddState(pool, &s, "opt.b1.", shard.b1, deep);
  AddState(pool, &s, "opt.w2.", shard.w2, deep);
  AddState(pool, &s, "opt.b2.", shard.b2, deep);
  return s;
}

std::vector<storage::ShardSnapshot> WorkerService::SnapshotsLocked(
    bool deep) const {
  std::vector<storage::ShardSnapshot> snapshots;
  for (const auto& [index, d] : dense_) {
    snapshots.push_back(SnapshotOf(*d, deep));
  }
  for (const auto& [id, shard] : shards_) {
    snapshots.push_back(SnapshotOf(*shard, deep));
  }
  for (auto& s : snapshots) {
    s.step = next_step_;
    s.epoch = epoch_;
  }
  return snapshots;
}

std::vector<storage::ShardSnapshot> WorkerService::Snapshots() const {
  std::lock_guard<std::mutex> lock(mu_);
  return SnapshotsLocked(/*deep=*/true);
}

StatusOr<storage::ShardSnapshot> WorkerService::FetchShard(
    const std::string& address, int64_t step,
    const storage::ShardSnapshot& like) {
  ASSIGN_OR_RETURN(ShardId id, ShardId::Parse(like.shard));
  std::vector<transport::Outgoing> requests;
  std::vector<size_t> index;
  for (size_t i = 0; i < like.tensors.size(); ++i) {
    if (like.tensors[i].tensor.empty()) continue;
    Message m;
    m.header.kind = static_cast<uint8_t>(MessageKind::kCheckpointFetch);
    m.header.step = step;
    m.header.layer = id.layer;
    m.header.expert = id.is_expert() ? id.expert : -1;
    m.header.shard = id.shard;
    m.header.micro_batch = static_cast<int32_t>(i);
    requests.push_back(
        {address, std::move(m), "fetching " + like.shard + " from " + address});
    index.push_back(i);
  }
  ASSIGN_OR_RETURN(
      std::vector<Tensor> replies,
      transport::SendAll(
          peers_, std::move(requests),
          std::chrono::milliseconds(config_.transport().request_timeout_ms())));
  storage::ShardSnapshot fetched;
  fetched.shard = like.shard;
  fetched.step = step;
  for (const auto& t : like.tensors) fetched.tensors.push_back({t.name, {}});
  for (size_t r = 0; r < replies.size(); ++r) {
    const Tensor& want = like.tensors[index[r]].tensor;
    if (replies[r].num_elements() != want.num_elements()) {
      return DataLossError(
          "fetched " + like.shard + " tensor " + like.tensors[index[r]].name +
          " has " + std::to_string(replies[r].num_elements()) +
          " values, expected " + std::to_string(want.num_elements()));
    }
    ASSIGN_OR_RETURN(fetched.tensors[index[r]].tensor,
                     replies[r].Reshape(want.shape()));
  }
  return fetched;
}

Status WorkerService::Restore(const control::RoutingTable& routing,
                              std::vector<storage::ShardSnapshot> shards) {
  const int64_t step = routing.resume_step();
  if (store_ == nullptr) {
    return FailedPreconditionError(
        name_ + " has no checkpoint store to resume step " +
        std::to_string(step) + " from (checkpoint.every is 0?)");
  }
  // Holders of the committed copies (the writer, then replicas), by shard,
  // and confirmed workers by name.
  std::map<std::string, std::vector<std::string>> holders;
  std::map<std::string, std::string> address;
  for (const auto& e : routing.entries()) {
    auto& h = holders[FromShardRef(e.shard()).ToString()];
    h.push_back(e.resume_holder());
    h.insert(h.end(), e.resume_replicas().begin(), e.resume_replicas().end());
  }
  for (const auto& w : routing.workers()) {
    if (w.confirmed()) address[w.name()] = w.data_address();
  }
  int fetched = 0;
  // The snapshots' tensors share storage with the new shards: filling them
  // fills the shards. Local copies first, several shards at a time.
  const std::vector<Status> locals =
      storage::ReadShardsInto(*store_, step, &shards, StorageThreads());
  for (size_t i = 0; i < shards.size(); ++i) {
    storage::ShardSnapshot& live = shards[i];
    const Status& local = locals[i];
    if (local.ok()) continue;
    StatusOr<storage::ShardSnapshot> saved = local;
    {
      // Not here (a resume on other workers) or damaged: from the holder.
      // The writer's copy first, then the replicas; the first good one.
      std::string tried;
      for (const std::string& from : holders[live.shard]) {
        if (from.empty() || from == name_) continue;
        if (peers_ == nullptr || !address.count(from)) {
          tried += " " + from + " (not running or not confirmed yet)";
          continue;
        }
        saved = FetchShard(address[from], step, live);
        if (saved.ok()) {
          LOG(WARNING) << name_ << ": " << live.shard << " at step " << step
                       << " fetched from " << from
                       << "; the local copy: " << local.ToString();
          break;
        }
        tried += " " + from + " (" + saved.status().ToString() + ")";
      }
      if (!saved.ok()) {
        return local.WithContext("restoring " + live.shard +
                                 "; no other copy could be had:" +
                                 (tried.empty() ? " none known" : tried));
      }
      RETURN_IF_ERROR(store_->WriteShard(*saved).status());  // Keep it here.
      ++fetched;
    }
    if (saved->tensors.size() != live.tensors.size()) {
      return DataLossError(
          "checkpoint of " + live.shard + " at step " + std::to_string(step) +
          " has " + std::to_string(saved->tensors.size()) +
          " tensors, the model " + std::to_string(live.tensors.size()));
    }
    for (size_t t = 0; t < live.tensors.size(); ++t) {
      Tensor& to = live.tensors[t].tensor;
      const Tensor& from = saved->tensors[t].tensor;
      if (saved->tensors[t].name != live.tensors[t].name ||
          to.empty() != from.empty() ||
          (!to.empty() &&
           (to.dtype() != from.dtype() || to.shape() != from.shape()))) {
        return FailedPreconditionError(
            "checkpoint of " + live.shard + " at step " + std::to_string(step) +
            ": tensor " + saved->tensors[t].name +
            " does not fit this model's " + live.tensors[t].name);
      }
      if (!to.empty()) std::memcpy(to.data(), from.data(), to.num_bytes());
    }
  }
  LOG(INFO) << name_ << ": restored " << shards.size()
            << " shards from checkpoint " << step << " (" << fetched
            << " fetched from peers)";
  return OkStatus();
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
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<control::ShardLoad> loads;
  for (auto& [id, s] : shards_) {
    control::ShardLoad load;
    *load.mutable_shard() = ToShardRef(id);
    load.set_tokens(s->tokens);
    s->tokens = 0;
    loads.push_back(load);
  }
  return loads;
}

}  // namespace switchyard::expert_worker
