#include "expert_worker/shard_transfer.h"

#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <optional>

#include "common/ids.h"
#include "common/metrics.h"
#include "common/shard_ref.h"
#include "common/thread_name.h"
#include "expert_worker/hosted_shard.h"

namespace switchyard::expert_worker {

using transport::Message;
using transport::MessageKind;

namespace {

// The requests fetching `like`'s tensors (one each, tensor index in
// micro_batch) from worker `source` at `address`, appended to `requests`; the
// tensor index of each appended to `index`. A handover is received straight
// into `like`'s tensors (the new shard's): a new home takes over the one
// source it has, and a failure throws the shard away. (A restore may try a
// second holder into the same tensors, where a late write of the first
// could land: it receives into fresh buffers.)
Status AppendFetches(const std::string& source, const std::string& address,
                     uint64_t epoch, int64_t step,
                     const storage::ShardSnapshot& like, bool handover,
                     std::vector<transport::Outgoing>* requests,
                     std::vector<size_t>* index) {
  ASSIGN_OR_RETURN(ShardId id, ShardId::Parse(like.shard));
  for (size_t i = 0; i < like.tensors.size(); ++i) {
    if (like.tensors[i].tensor.empty()) continue;
    Message m;
    m.header.kind = static_cast<uint8_t>(
        handover ? MessageKind::kShardHandover : MessageKind::kCheckpointFetch);
    m.header.epoch = epoch;
    m.header.step = step;
    m.header.layer = id.layer;
    m.header.expert = id.is_expert() ? id.expert : -1;
    m.header.shard = id.shard;
    m.header.micro_batch = static_cast<int32_t>(i);
    if (handover) m.receive_into = like.tensors[i].tensor;
    requests->push_back({address, std::move(m),
                         "fetching " + like.shard + " from " + source +
                             (source == address ? "" : " at " + address)});
    index->push_back(i);
  }
  return OkStatus();
}

// `like`'s tensors from `replies` [first, first + index.size()), checked
// and shaped like `like`'s.
// The shard a fetch or handover request names.
std::string ShardNamed(const transport::WireHeader& h) {
  return (h.expert < 0 ? ShardId::Dense(h.shard)
                       : ShardId::Expert(h.layer, h.expert, h.shard))
      .ToString();
}

StatusOr<storage::ShardSnapshot> Assemble(const storage::ShardSnapshot& like,
                                          int64_t step,
                                          std::vector<Tensor>& replies,
                                          size_t first,
                                          const std::vector<size_t>& index) {
  storage::ShardSnapshot fetched;
  fetched.shard = like.shard;
  fetched.step = step;
  for (const auto& t : like.tensors) fetched.tensors.push_back({t.name, {}});
  for (size_t r = 0; r < index.size(); ++r) {
    const Tensor& want = like.tensors[index[r]].tensor;
    const Tensor& got = replies[first + r];
    if (got.num_elements() != want.num_elements()) {
      return DataLossError(
          "fetched " + like.shard + " tensor " + like.tensors[index[r]].name +
          " has " + std::to_string(got.num_elements()) + " values, expected " +
          std::to_string(want.num_elements()));
    }
    ASSIGN_OR_RETURN(fetched.tensors[index[r]].tensor,
                     got.Reshape(want.shape()));
  }
  return fetched;
}

}  // namespace

StatusOr<storage::ShardSnapshot> ShardTransfer::Fetch(
    const std::string& address, uint64_t epoch, int64_t step,
    const storage::ShardSnapshot& like, bool handover) {
  std::vector<transport::Outgoing> requests;
  std::vector<size_t> index;
  RETURN_IF_ERROR(AppendFetches(address, address, epoch, step, like, handover,
                                &requests, &index));
  ASSIGN_OR_RETURN(
      std::vector<Tensor> replies,
      transport::SendAll(
          peers_, std::move(requests),
          std::chrono::milliseconds(config_.transport().request_timeout_ms())));
  return Assemble(like, step, replies, 0, index);
}

Status ShardTransfer::Restore(const control::RoutingTable& routing,
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
  std::map<std::string, std::string> committed_digest;
  std::map<std::string, std::string> address;
  for (const auto& e : routing.entries()) {
    const std::string shard = FromShardRef(e.shard()).ToString();
    auto& h = holders[shard];
    h.push_back(e.resume_holder());
    h.insert(h.end(), e.resume_replicas().begin(), e.resume_replicas().end());
    committed_digest[shard] = e.resume_digest();
  }
  // A copy counts only if it is what the coordinator committed: the chunk
  // checksums catch damaged bytes, the digest a whole wrong copy (another
  // run's, an older write).
  const auto check_digest = [&](const storage::ShardSnapshot& copy,
                                const std::string& where) -> Status {
    const std::string& want = committed_digest[copy.shard];
    if (want.empty()) return OkStatus();  // A table without digests.
    const std::string got = storage::SnapshotDigest(copy);
    if (got == want) return OkStatus();
    return DataLossError(where + " copy of " + copy.shard + " at step " +
                         std::to_string(step) + " has digest " + got +
                         ", the committed digest is " + want);
  };
  for (const auto& w : routing.workers()) {
    if (w.confirmed()) address[w.name()] = w.data_address();
  }
  int fetched = 0;
  // The snapshots' tensors share storage with the new shards: filling them
  // fills the shards. Copies kept in memory first (a live worker rolling
  // back), then local copies, several shards at a time.
  const size_t total = shards.size();
  int from_memory = 0;
  if (const auto kept = memory_ ? memory_(step) : nullptr) {
    std::vector<storage::ShardSnapshot> rest;
    for (storage::ShardSnapshot& live : shards) {
      auto copy = kept->shards.find(live.shard);
      auto digest = kept->digests.find(live.shard);
      const std::string& want = committed_digest[live.shard];
      if (copy != kept->shards.end() && digest != kept->digests.end() &&
          (want.empty() || digest->second == want) &&
          CopyTensors(copy->second, &live).ok()) {
        ++from_memory;
      } else {
        rest.push_back(std::move(live));
      }
    }
    shards = std::move(rest);
  }
  std::vector<Status> locals =
      storage::ReadShardsInto(*store_, step, &shards, threads_);
  for (size_t i = 0; i < shards.size(); ++i) {
    storage::ShardSnapshot& live = shards[i];
    if (locals[i].ok()) locals[i] = check_digest(live, name_ + "'s");
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
        saved = Fetch(address[from], routing.epoch(), step, live);
        if (saved.ok()) {
          Status matches = check_digest(*saved, from + "'s");
          if (!matches.ok()) saved = matches;
        }
        if (saved.ok()) {
          LOG(WARNING) << name_ << ": " << live.shard << " at step " << step
                       << " fetched from " << from
                       << "; the local copy: " << local.ToString();
          break;
        }
        tried += " " + from + " (" + saved.status().ToString() + ")";
      }
      if (!saved.ok()) {
        // DATA_LOSS when any copy was damaged or not the committed one.
        const bool damaged = local.code() == StatusCode::kDataLoss ||
                             tried.find("DATA_LOSS") != std::string::npos;
        return Status(damaged ? StatusCode::kDataLoss : local.code(),
                      local.message())
            .WithContext("restoring " + live.shard +
                         "; no other copy could be had:" +
                         (tried.empty() ? " none known" : tried));
      }
      RETURN_IF_ERROR(store_->WriteShard(*saved).status());  // Keep it here.
      ++fetched;
    }
    RETURN_IF_ERROR(CopyTensors(*saved, &live));
  }
  LOG(INFO) << name_ << ": restored " << total << " shards from checkpoint "
            << step << " (" << from_memory << " from memory, " << fetched
            << " fetched from peers)";
  return OkStatus();
}

Status ShardTransfer::TakeOver(const control::RoutingTable& routing,
                               std::vector<storage::ShardSnapshot> shards) {
  if (shards.empty()) return OkStatus();
  if (peers_ == nullptr) return FailedPreconditionError("no data plane");
  const auto start = std::chrono::steady_clock::now();
  std::map<std::string, std::string> from, address;
  for (const auto& e : routing.entries()) {
    if (!e.moved_from().empty()) {
      from[FromShardRef(e.shard()).ToString()] = e.moved_from();
    }
  }
  for (const auto& w : routing.workers()) address[w.name()] = w.data_address();
  // Every tensor of every shard in flight at once.
  std::vector<transport::Outgoing> requests;
  std::vector<std::vector<size_t>> index(shards.size());
  for (size_t i = 0; i < shards.size(); ++i) {
    auto source = from.find(shards[i].shard);
    if (source == from.end() || !address.count(source->second)) {
      return FailedPreconditionError(
          "epoch " + std::to_string(routing.epoch()) + " moves " +
          shards[i].shard + " here without a live old home to hand it over");
    }
    RETURN_IF_ERROR(AppendFetches(source->second, address[source->second],
                                  routing.epoch(), routing.resume_step(),
                                  shards[i],
                                  /*handover=*/true, &requests, &index[i]));
  }
  StatusOr<std::vector<Tensor>> replies = transport::SendAll(
      peers_, std::move(requests),
      std::chrono::milliseconds(config_.transport().request_timeout_ms()));
  if (!replies.ok()) {
    return replies.status().WithContext(
        "taking over " + std::to_string(shards.size()) + " shards moved here");
  }
  const double fetch_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  int64_t bytes = 0;
  size_t first = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    ASSIGN_OR_RETURN(
        storage::ShardSnapshot copy,
        Assemble(shards[i], routing.resume_step(), *replies, first, index[i]));
    first += index[i].size();
    RETURN_IF_ERROR(CopyTensors(copy, &shards[i]));
    for (const auto& t : shards[i].tensors) bytes += t.tensor.num_bytes();
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  LOG(INFO) << name_ << ": took over " << shards.size()
            << " shards live at step " << routing.resume_step() << " (" << bytes
            << " bytes in " << seconds << " s, "
            << bytes / std::max(seconds, 1e-9) / 1e6 << " MB/s; fetched in "
            << fetch_seconds << " s)";
  MetricsRegistry::Global()
      .GetCounter("switchyard_worker_shards_taken_over_total")
      ->Increment(shards.size());
  return OkStatus();
}

Status ShardTransfer::CopyTensors(const storage::ShardSnapshot& saved,
                                  storage::ShardSnapshot* live) {
  const std::string what =
      "checkpoint of " + live->shard + " at step " + std::to_string(saved.step);
  if (saved.tensors.size() != live->tensors.size()) {
    return DataLossError(what + " has " + std::to_string(saved.tensors.size()) +
                         " tensors, the model " +
                         std::to_string(live->tensors.size()));
  }
  for (size_t t = 0; t < live->tensors.size(); ++t) {
    Tensor& to = live->tensors[t].tensor;
    const Tensor& from = saved.tensors[t].tensor;
    if (saved.tensors[t].name != live->tensors[t].name ||
        to.empty() != from.empty() ||
        (!to.empty() &&
         (to.dtype() != from.dtype() || to.shape() != from.shape()))) {
      return FailedPreconditionError(
          what + ": tensor " + saved.tensors[t].name +
          " does not fit this model's " + live->tensors[t].name);
    }
  }
  for (size_t t = 0; t < live->tensors.size(); ++t) {
    Tensor& to = live->tensors[t].tensor;
    const void* from = saved.tensors[t].tensor.data();
    // A handover arrives in place (AppendFetches).
    if (!to.empty() && from != to.data()) {
      std::memcpy(to.data(), from, to.num_bytes());
    }
  }
  return OkStatus();
}

Status ShardTransfer::Replicate(const control::ReplicationTask& task,
                                const CheckpointWriter::Reporter& report_to) {
  if (peers_ == nullptr) return FailedPreconditionError("no data plane");
  const auto start = std::chrono::steady_clock::now();
  control::CheckpointReport report;
  report.set_step(task.step());
  report.set_replica(true);
  uint64_t bytes = 0;
  const auto unused = BufferPool::Create(0);  // Shallow snapshots only.
  for (const auto& ref : task.shards()) {
    // Tensors shaped like the shard's, from a zero-filled one.
    storage::ShardSnapshot like;
    std::unique_ptr<ExpertShard> expert;
    std::unique_ptr<DenseShard> dense;
    if (ref.kind() == control::DENSE) {
      ASSIGN_OR_RETURN(dense,
                       factory_->NewDense(ref.shard(), /*initialise=*/false));
      like = SnapshotOf(*dense, *unused, /*deep=*/false);
    } else {
      ASSIGN_OR_RETURN(expert, factory_->NewExpert(FromShardRef(ref),
                                                   /*initialise=*/false));
      like = SnapshotOf(*expert, *unused, /*deep=*/false);
    }
    ASSIGN_OR_RETURN(
        storage::ShardSnapshot copy,
        Fetch(task.source_address(), task.epoch(), task.step(), like));
    ASSIGN_OR_RETURN(auto manifest, store_->WriteShard(copy));
    auto* shard = report.add_shards();
    *shard->mutable_shard() = ref;
    shard->set_digest(manifest.digest());
    shard->set_bytes(manifest.total_bytes());
    bytes += manifest.total_bytes();
  }
  if (report_to) RETURN_IF_ERROR(report_to(report));
  LOG(INFO) << name_ << ": replicated " << task.shards_size()
            << " shards of checkpoint " << task.step() << " from "
            << task.source() << " (" << bytes << " bytes in "
            << std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                             start)
                   .count()
            << " s)";
  return OkStatus();
}

void CheckpointFetchServer::Start() {
  thread_ = StartNamedThread("sy-ckpt-fetch", [this] { Loop(); });
}

void CheckpointFetchServer::Shutdown() {
  stopped_.store(true, std::memory_order_release);
  queue_.Close();
  if (thread_.joinable()) thread_.join();
  // Whatever is left is answered, never dropped.
  AnswerShuttingDown(queue_.Drain(), name_);
}

void CheckpointFetchServer::Serve(Task task) {
  if (task.request.header.kind ==
          static_cast<uint8_t>(MessageKind::kShardHandover) &&
      !stopped_.load(std::memory_order_acquire)) {
    ServeHandover(task);
    return;
  }
  std::optional<Task> refused = queue_.Push(std::move(task));
  if (refused) AnswerShuttingDown({std::move(*refused)}, name_);
}

void CheckpointFetchServer::ServeHandover(Task& task) {
  const transport::WireHeader& h = task.request.header;
  const std::string shard = ShardNamed(h);
  // Served to its own epoch only (Handovers matches it), also once this
  // worker is at a newer one: a hold that came while the new home was
  // still fetching must not fail the move.
  auto handed = handovers_ ? handovers_(h.epoch, h.step, shard)
                           : NotFoundError(name_ + " hands nothing over");
  const storage::ShardSnapshot* s = handed.ok() ? handed->get() : nullptr;
  if (s == nullptr || h.micro_batch < 0 ||
      h.micro_batch >= static_cast<int32_t>(s->tensors.size()) ||
      s->tensors[h.micro_batch].tensor.empty()) {
    task.reply(transport::ErrorResponse(
        h, handed.ok()
               ? NotFoundError("handover of " + shard + " has no tensor " +
                               std::to_string(h.micro_batch))
               : handed.status()));
    return;
  }
  const Tensor& t = s->tensors[h.micro_batch].tensor;
  task.reply(
      transport::TensorResponse(h, t.Reshape({1, t.num_elements()}).value()));
}

void CheckpointFetchServer::Loop() {
  // The last shard read: a fetch asks for its tensors one by one.
  std::optional<storage::ShardSnapshot> cached;
  while (std::optional<Task> task = queue_.Pop()) {
    const transport::WireHeader& h = task->request.header;
    const uint64_t epoch = current_epoch_();
    if (h.epoch < epoch) {
      task->reply(transport::ErrorResponse(
          h, FailedPreconditionError(
                 "stale epoch " + std::to_string(h.epoch) + ": " + name_ +
                 " is at epoch " + std::to_string(epoch) +
                 "; checkpoint fetches must come from the current routing")));
      continue;
    }
    const std::string shard = ShardNamed(h);
    if (store_ == nullptr) {
      task->reply(transport::ErrorResponse(
          h, FailedPreconditionError(name_ + " keeps no checkpoints")));
      continue;
    }
    if (!cached || cached->step != h.step || cached->shard != shard) {
      cached.reset();
      auto read = store_->ReadShard(h.step, shard);  // Verifies every chunk.
      if (!read.ok()) {
        task->reply(transport::ErrorResponse(
            h, read.status().WithContext(name_ + " serving a fetch")));
        continue;
      }
      cached = std::move(read).value();
    }
    if (h.micro_batch < 0 ||
        h.micro_batch >= static_cast<int32_t>(cached->tensors.size()) ||
        cached->tensors[h.micro_batch].tensor.empty()) {
      task->reply(transport::ErrorResponse(
          h, NotFoundError("checkpoint of " + shard + " at step " +
                           std::to_string(h.step) + " has no tensor " +
                           std::to_string(h.micro_batch))));
      continue;
    }
    const Tensor& t = cached->tensors[h.micro_batch].tensor;
    task->reply(
        transport::TensorResponse(h, t.Reshape({1, t.num_elements()}).value()));
  }
}

}  // namespace switchyard::expert_worker
