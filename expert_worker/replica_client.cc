#include "expert_worker/replica_client.h"

#include <glog/logging.h>

#include <algorithm>
#include <iterator>
#include <optional>
#include <tuple>
#include <utility>

#include "common/metrics.h"
#include "common/shard_ref.h"
#include "expert_worker/replication.h"

namespace switchyard::expert_worker {

using transport::Message;
using transport::MessageKind;

class ReplicaClient::Pending {
 public:
  Pending(std::string host, Deadline deadline)
      : host_(std::move(host)), deadline_(deadline) {}

  const std::string& host() const { return host_; }
  Deadline deadline() const { return deadline_; }
  void Done(StatusOr<Message> result) EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    result_ = std::move(result);
    cv_.NotifyAll();
  }
  bool answered() const EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    return result_.has_value() || std::chrono::steady_clock::now() >= deadline_;
  }
  // The answer, or DEADLINE_EXCEEDED after `deadline`.
  StatusOr<Message> Await(std::chrono::steady_clock::time_point deadline)
      EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    while (!result_.has_value()) {
      if (!cv_.WaitUntil(&mu_, deadline) && !result_.has_value()) {
        return DeadlineExceededError("no answer from " + host_);
      }
    }
    return std::move(*result_);
  }

 private:
  const std::string host_;
  const Deadline deadline_;
  mutable Mutex mu_;
  CondVar cv_;
  std::optional<StatusOr<Message>> result_ GUARDED_BY(mu_);
};

namespace {

Counter* Offloaded() {
  static Counter* c = MetricsRegistry::Global().GetCounter(
      "switchyard_worker_replica_chunks_offloaded_total");
  return c;
}

Counter* FellBack() {
  static Counter* c = MetricsRegistry::Global().GetCounter(
      "switchyard_worker_replica_failures_total");
  return c;
}

transport::WireHeader HeaderFor(MessageKind kind, const ShardId& id,
                                uint64_t epoch, int64_t step) {
  transport::WireHeader h;
  h.kind = static_cast<uint8_t>(kind);
  h.epoch = epoch;
  h.step = step;
  h.layer = id.layer;
  h.expert = id.expert;
  h.shard = id.shard;
  return h;
}

}  // namespace

ReplicaClient::ReplicaClient(const config::SwitchyardConfig& config,
                             std::string name, transport::DataPlane* peers,
                             std::function<void()> answered)
    : name_(std::move(name)),
      peers_(peers),
      answered_(std::move(answered)),
      budget_(
          std::max<int64_t>(1, config.transport().request_timeout_ms() / 4)),
      compute_(config.training().compute_dtype() == "bf16" ? DType::kBF16
                                                           : DType::kF32),
      pool_(BufferPool::Create(size_t{256} << 20)) {}

void ReplicaClient::SetRouting(const control::RoutingTable& routing) {
  // The other workers, the least loaded (bytes of shards the table places
  // there) first, then by name.
  std::vector<int64_t> bytes(routing.workers_size(), 0);
  for (const auto& e : routing.entries()) {
    if (e.worker() >= 0 && e.worker() < routing.workers_size()) {
      bytes[e.worker()] += e.bytes();
    }
  }
  std::vector<std::tuple<int64_t, std::string, std::string>> ranked;
  for (int i = 0; i < routing.workers_size(); ++i) {
    const auto& w = routing.workers(i);
    if (w.confirmed() && w.name() != name_ && !w.data_address().empty()) {
      ranked.emplace_back(bytes[i], w.name(), w.data_address());
    }
  }
  std::sort(ranked.begin(), ranked.end());
  // The expert shards this worker is the primary of from now on.
  std::set<ShardId> hosted;
  for (const auto& e : routing.entries()) {
    if (e.shard().kind() == control::EXPERT && e.worker() >= 0 &&
        e.worker() < routing.workers_size() &&
        routing.workers(e.worker()).name() == name_) {
      hosted.insert(FromShardRef(e.shard()));
    }
  }
  // Copies of shards moved away are dropped now (nothing here would drop
  // them later), each drop naming the weights this worker sent, so that
  // it leaves newer ones the shard's new primary may have sent the host.
  std::vector<std::pair<std::string, transport::WireHeader>> drops;
  {
    MutexLock lock(&mu_);
    if (routing.epoch() <= epoch_) return;
    epoch_ = routing.epoch();
    addresses_.clear();
    by_bytes_.clear();
    std::set<std::string> present;
    for (auto& [b, n, address] : ranked) {
      addresses_[n] = address;
      by_bytes_.push_back(address);
      present.insert(address);
    }
    const auto moved = [&](const std::pair<std::string, ShardId>& key) {
      return present.count(key.first) && !hosted.count(key.second);
    };
    for (const auto& [key, ahead] : ahead_) {
      if (moved(key)) {
        drops.emplace_back(key.first,
                           HeaderFor(MessageKind::kReplicaDrop, key.second,
                                     ahead.epoch, ahead.step));
      }
    }
    // Copies of shards still here on hosts still here are dropped when
    // their shard's next step places its chunks elsewhere (BeginStep).
    for (auto it = weights_.begin(); it != weights_.end();) {
      const auto& [key, at] = *it;
      if (moved(key)) {
        drops.emplace_back(key.first,
                           HeaderFor(MessageKind::kReplicaDrop, key.second,
                                     at.first, at.second));
      }
      it = present.count(key.first) && !moved(key) ? std::next(it)
                                                   : weights_.erase(it);
    }
    failed_.clear();
    assigned_.clear();
    ahead_.clear();
  }
  for (const auto& [host, header] : drops) {
    Send(host, transport::TensorMessage(header, Tensor()), NewDeadline());
  }
}

void ReplicaClient::SetCopyHosts(std::vector<std::string> names) {
  MutexLock lock(&mu_);
  ranking_ = std::move(names);
}

std::vector<std::string> ReplicaClient::Candidates() const {
  std::vector<std::string> out;
  // Those the coordinator ranks below this worker; if none, every other;
  // never those that failed in this epoch.
  for (int pass = 0; pass < 2 && out.empty(); ++pass) {
    for (const std::string& n : ranking_) {
      if (n == name_) {
        if (pass == 0) break;
        continue;
      }
      auto a = addresses_.find(n);
      if (a != addresses_.end() && failed_.count(a->second) == 0) {
        out.push_back(a->second);
      }
    }
  }
  if (out.empty()) {
    for (const std::string& host : by_bytes_) {
      if (failed_.count(host) == 0) out.push_back(host);
    }
  }
  return out;
}

void ReplicaClient::BeginStep(const ShardId& id, uint64_t epoch, int64_t step,
                              int chunks) {
  // Hosts whose copies go (a drop also refuses the weights sent ahead to
  // them, should they come after it).
  std::vector<std::string> drop;
  {
    MutexLock lock(&mu_);
    if (epoch != epoch_) return;
    Assignment& a = assigned_[id];
    if (a.epoch == epoch && a.step == step) return;
    // Not replicated in this epoch, nor now: nothing to place or drop.
    const bool none = a.epoch == epoch && a.hosts.empty() && chunks <= 1;
    a.step = step;
    if (none) return;
    // Chunks 1.. on distinct hosts, starting at a place that differs from
    // shard to shard so that copies spread; the hosts of the step before
    // stay while they are still candidates (a move costs a full push).
    const std::vector<std::string> candidates = Candidates();
    const int n = static_cast<int>(candidates.size());
    std::vector<std::string> hosts;
    for (int c = 1; c < chunks && c <= n; ++c) {
      hosts.push_back(
          candidates[static_cast<size_t>(c - 1 + id.layer + id.expert) % n]);
    }
    const bool kept =
        a.epoch == epoch && a.hosts.size() == hosts.size() &&
        std::all_of(a.hosts.begin(), a.hosts.end(), [&](const std::string& h) {
          return std::find(candidates.begin(), candidates.end(), h) !=
                 candidates.end();
        });
    a.epoch = epoch;
    if (!kept) a.hosts = std::move(hosts);
    // The copies (weights there, or on their way) of hosts not used now.
    const auto unused = [&](const auto& entry) {
      const auto& [host, shard] = entry.first;
      if (shard != id ||
          std::find(a.hosts.begin(), a.hosts.end(), host) != a.hosts.end()) {
        return false;
      }
      if (std::find(drop.begin(), drop.end(), host) == drop.end()) {
        drop.push_back(host);
      }
      return true;
    };
    std::erase_if(weights_, unused);
    std::erase_if(ahead_, unused);
  }
  // Freed at once; a host that does not answer keeps it until evicted.
  for (const std::string& host : drop) {
    Send(host,
         transport::TensorMessage(
             HeaderFor(MessageKind::kReplicaDrop, id, epoch, step), Tensor()),
         NewDeadline());
  }
}

std::string ReplicaClient::HostOf(const ShardId& id, uint64_t epoch,
                                  int64_t step, int chunk) const {
  auto a = assigned_.find(id);
  if (a == assigned_.end() || a->second.epoch != epoch ||
      a->second.step != step || chunk < 1 ||
      chunk > static_cast<int>(a->second.hosts.size())) {
    return "";
  }
  const std::string& host = a->second.hosts[chunk - 1];
  return failed_.count(host) ? "" : host;
}

std::string ReplicaClient::Summary() const {
  return std::to_string(chunks_.load()) + " chunks and " +
         std::to_string(shares_.load()) +
         " gradient shares computed by copies elsewhere, " +
         std::to_string(failures_.load()) +
         " failures (their chunks computed here)";
}

void ReplicaClient::Failed(const std::string& host, const Status& why) {
  FellBack()->Increment();
  failures_.fetch_add(1);
  MutexLock lock(&mu_);
  if (failed_.insert(host).second) {
    LOG(WARNING) << name_ << ": the replica host " << host
                 << " failed; its chunks run here until the next routing "
                    "epoch: "
                 << why.ToString();
  }
}

std::shared_ptr<ReplicaClient::Pending> ReplicaClient::Send(
    const std::string& host, Message message, Deadline deadline) {
  auto pending = std::make_shared<Pending>(host, deadline);
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  peers_->Send(host, std::move(message),
               std::max(left, std::chrono::milliseconds(1)),
               [pending, answered = answered_](StatusOr<Message> r) {
                 pending->Done(std::move(r));
                 if (answered) answered();
               });
  return pending;
}

void ReplicaClient::PushAhead(const ShardId& id, const ExpertParams& params,
                              uint64_t epoch, int64_t step) {
  std::vector<std::string> hosts;
  {
    MutexLock lock(&mu_);
    auto a = assigned_.find(id);
    if (epoch != epoch_ || a == assigned_.end() || a->second.epoch != epoch) {
      return;
    }
    const auto at = std::make_pair(epoch, step);
    for (const std::string& host : a->second.hosts) {
      auto w = weights_.find({host, id});
      auto p = ahead_.find({host, id});
      if (failed_.count(host) || (w != weights_.end() && w->second == at) ||
          (p != ahead_.end() && p->second.epoch == epoch &&
           p->second.step == step)) {
        continue;
      }
      hosts.push_back(host);
    }
  }
  if (hosts.empty()) return;
  auto flat = WeightsForCopies(params, compute_, pool_.get());
  if (!flat.ok()) return;  // The forward pushes them then.
  for (const std::string& host : hosts) {
    // Every host reads the same buffer.
    auto push = Send(
        host,
        transport::TensorMessage(
            HeaderFor(MessageKind::kReplicaWeights, id, epoch, step), *flat),
        NewDeadline());
    MutexLock lock(&mu_);
    ahead_[{host, id}] = {epoch, step, std::move(push)};
  }
}

std::shared_ptr<ReplicaClient::Pending> ReplicaClient::Start(
    MessageKind kind, const ShardId& id, const ExpertParams& params,
    uint64_t epoch, int64_t step, int32_t micro_batch, int chunk, Tensor rows,
    Deadline deadline) {
  std::string host;
  bool has_weights = false;
  {
    MutexLock lock(&mu_);
    if (epoch != epoch_) return nullptr;
    host = HostOf(id, epoch, step, chunk);
    if (host.empty()) return nullptr;
    auto it = weights_.find({host, id});
    has_weights =
        it != weights_.end() && it->second == std::make_pair(epoch, step);
  }
  if (!has_weights) {
    if (kind != MessageKind::kReplicaForward) return nullptr;
    std::shared_ptr<Pending> push;
    {
      MutexLock lock(&mu_);
      auto ahead = ahead_.find({host, id});
      if (ahead != ahead_.end()) {
        if (ahead->second.epoch == epoch && ahead->second.step == step) {
          push = std::move(ahead->second.push);
        }
        ahead_.erase(ahead);
      }
    }
    if (push == nullptr) {
      auto flat = WeightsForCopies(params, compute_, pool_.get());
      if (!flat.ok()) return nullptr;
      push = Send(host,
                  transport::TensorMessage(
                      HeaderFor(MessageKind::kReplicaWeights, id, epoch, step),
                      std::move(flat).value()),
                  deadline);
    }
    auto answer = Wait(*push);
    if (!answer.ok()) return nullptr;
    MutexLock lock(&mu_);
    weights_[{host, id}] = {epoch, step};
  }
  transport::WireHeader h = HeaderFor(kind, id, epoch, step);
  h.micro_batch = micro_batch;
  h.trainer_rank = chunk;
  Offloaded()->Increment();
  return Send(host, transport::TensorMessage(h, std::move(rows)), deadline);
}

StatusOr<Tensor> ReplicaClient::Wait(Pending& pending) {
  StatusOr<Message> answer = pending.Await(pending.deadline());
  Status why = answer.status();
  if (answer.ok() && answer->header.status_code != 0) {
    why = Status(static_cast<StatusCode>(answer->header.status_code),
                 answer->error_text);
  }
  if (!why.ok()) {
    Failed(pending.host(), why);
    return why;
  }
  const auto kind = static_cast<MessageKind>(answer->header.kind);
  if (kind == MessageKind::kReplicaShare) {
    shares_.fetch_add(1);
  } else if (kind == MessageKind::kReplicaForward ||
             kind == MessageKind::kReplicaBackward) {
    chunks_.fetch_add(1);
    if (kind == MessageKind::kReplicaForward && !answer->payload.empty()) {
      rows_offloaded_.fetch_add(answer->payload.dim(0));
    }
  }
  return std::move(answer->payload);
}

bool ReplicaClient::Answered(const Pending& pending) {
  return pending.answered();
}

ReplicaClient::Deadline ReplicaClient::DeadlineOf(const Pending& pending) {
  return pending.deadline();
}

StatusOr<Tensor> ReplicaClient::Share(const ShardId& id, uint64_t epoch,
                                      int64_t step, int chunk,
                                      int micro_batches, Deadline deadline) {
  std::string host;
  {
    MutexLock lock(&mu_);
    if (epoch != epoch_) return AbortedError("another routing epoch");
    host = HostOf(id, epoch, step, chunk);
    if (host.empty()) return UnavailableError("no host for the chunk");
  }
  transport::WireHeader h =
      HeaderFor(MessageKind::kReplicaShare, id, epoch, step);
  h.micro_batch = micro_batches;  // What the share must cover.
  h.trainer_rank = chunk;
  auto pending = Send(host, transport::TensorMessage(h, Tensor()), deadline);
  return Wait(*pending);
}

}  // namespace switchyard::expert_worker
