#include "transport/local/in_process_data_plane.h"

#include <atomic>
#include <map>
#include <string>
#include <thread>

#include "common/mutex.h"
#include "common/thread_annotations.h"
#include "common/thread_name.h"

namespace switchyard::transport {

namespace {

using Clock = std::chrono::steady_clock;

// Request handlers by address, process-wide.
struct Registry {
  Mutex mu;
  std::map<std::string, std::shared_ptr<RequestHandler>> handlers
      GUARDED_BY(mu);
};
Registry& TheRegistry() {
  static auto* registry = new Registry();
  return *registry;
}

StatusOr<Message> ToResult(Message response) {
  if (response.header.status_code != 0) {
    return Status(static_cast<StatusCode>(response.header.status_code),
                  response.error_text);
  }
  return response;
}

// The outstanding requests of one data plane; replies and the deadline
// thread race to complete each one exactly once.
struct PendingTable {
  struct Entry {
    Clock::time_point deadline;
    ResponseCallback done;
    std::string peer;
  };
  Mutex mu;
  CondVar cv;
  std::map<uint64_t, Entry> entries GUARDED_BY(mu);
  uint64_t next_id GUARDED_BY(mu) = 1;
  bool stopped GUARDED_BY(mu) = false;

  // Removes and returns the callback of `id`, or null when already done.
  ResponseCallback Take(uint64_t id) EXCLUDES(mu) {
    MutexLock lock(&mu);
    auto it = entries.find(id);
    if (it == entries.end()) return nullptr;
    ResponseCallback done = std::move(it->second.done);
    entries.erase(it);
    return done;
  }
};

class InProcessDataPlane : public DataPlane {
 public:
  InProcessDataPlane() : pending_(std::make_shared<PendingTable>()) {
    static std::atomic<int> next_address{0};
    address_ = "inproc:" + std::to_string(next_address.fetch_add(1));
    deadlines_ = StartNamedThread("sy-deadlines", [this] { ExpireLoop(); });
  }
  ~InProcessDataPlane() override { Shutdown(); }

  Status Start(RequestHandler handler) override {
    Registry& registry = TheRegistry();
    MutexLock lock(&registry.mu);
    if (!registry.handlers
             .emplace(address_,
                      std::make_shared<RequestHandler>(std::move(handler)))
             .second) {
      return AlreadyExistsError("data plane " + address_ + " already started");
    }
    return OkStatus();
  }

  void Shutdown() override {
    {
      Registry& registry = TheRegistry();
      MutexLock lock(&registry.mu);
      registry.handlers.erase(address_);
    }
    std::map<uint64_t, PendingTable::Entry> cancelled;
    {
      MutexLock lock(&pending_->mu);
      if (pending_->stopped) return;
      pending_->stopped = true;
      cancelled.swap(pending_->entries);
    }
    pending_->cv.NotifyAll();
    if (deadlines_.joinable()) deadlines_.join();
    for (auto& [id, entry] : cancelled) {
      entry.done(CancelledError("data plane " + address_ + " shut down"));
    }
  }

  std::string address() const override { return address_; }

  void FailPending(const Status& why) override {
    std::map<uint64_t, PendingTable::Entry> failed;
    {
      MutexLock lock(&pending_->mu);
      failed.swap(pending_->entries);
    }
    for (auto& [id, entry] : failed) entry.done(why);
  }

  void Send(const std::string& peer, Message request,
            std::chrono::milliseconds timeout, ResponseCallback done) override {
    std::shared_ptr<RequestHandler> handler;
    {
      Registry& registry = TheRegistry();
      MutexLock lock(&registry.mu);
      auto it = registry.handlers.find(peer);
      if (it != registry.handlers.end()) handler = it->second;
    }
    if (handler == nullptr) {
      done(UnavailableError("no in-process data plane at " + peer));
      return;
    }
    uint64_t id = 0;
    bool stopped = false;
    {
      MutexLock lock(&pending_->mu);
      stopped = pending_->stopped;
      if (!stopped) {
        id = pending_->next_id++;
        pending_->entries[id] = {Clock::now() + timeout, std::move(done), peer};
      }
    }
    if (stopped) {
      done(CancelledError("data plane " + address_ + " shut down"));
      return;
    }
    pending_->cv.NotifyAll();  // A new, perhaps earliest, deadline.
    request.header.request_id = id;
    std::weak_ptr<PendingTable> weak = pending_;
    (*handler)(std::move(request), [weak, id](Message response) {
      auto pending = weak.lock();
      if (pending == nullptr) return;  // The sender is gone.
      ResponseCallback callback = pending->Take(id);
      if (callback) callback(ToResult(std::move(response)));
    });
  }

 private:
  void ExpireLoop() {
    MutexLock lock(&pending_->mu);
    while (!pending_->stopped) {
      if (pending_->entries.empty()) {
        pending_->cv.Wait(&pending_->mu);
        continue;
      }
      auto earliest = pending_->entries.begin();
      for (auto it = pending_->entries.begin(); it != pending_->entries.end();
           ++it) {
        if (it->second.deadline < earliest->second.deadline) earliest = it;
      }
      // A copy: the entry may be answered and erased while this waits, and
      // the wait reads its deadline again when it wakes (ASan found this
      // use-after-free in DataPlaneTest.ManyConcurrentRequests/InProcess).
      const Clock::time_point deadline = earliest->second.deadline;
      if (Clock::now() < deadline) {
        pending_->cv.WaitUntil(&pending_->mu, deadline);
        continue;
      }
      ResponseCallback done = std::move(earliest->second.done);
      const std::string peer = std::move(earliest->second.peer);
      pending_->entries.erase(earliest);
      lock.Unlock();
      const Status late = DeadlineExceededError("in-process request to " +
                                                peer + " not answered in time");
      done(late);
      NotifyPeerLost(peer, late);
      lock.Lock();
    }
  }

  std::shared_ptr<PendingTable> pending_;
  std::string address_;
  std::thread deadlines_;
};

}  // namespace

std::unique_ptr<DataPlane> NewInProcessDataPlane() {
  return std::make_unique<InProcessDataPlane>();
}

}  // namespace switchyard::transport
