#include "transport/local/in_process_data_plane.h"

#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include "common/thread_name.h"

namespace switchyard::transport {

namespace {

using Clock = std::chrono::steady_clock;

// Request handlers by address, process-wide.
std::mutex& RegistryMutex() {
  static std::mutex mu;
  return mu;
}
std::map<std::string, std::shared_ptr<RequestHandler>>& Registry() {
  static auto* registry =
      new std::map<std::string, std::shared_ptr<RequestHandler>>();
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
  };
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint64_t, Entry> entries;  // GUARDED_BY(mu)
  uint64_t next_id = 1;               // GUARDED_BY(mu)
  bool stopped = false;               // GUARDED_BY(mu)

  // Removes and returns the callback of `id`, or null when already done.
  ResponseCallback Take(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu);
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
    std::lock_guard<std::mutex> lock(RegistryMutex());
    if (!Registry()
             .emplace(address_,
                      std::make_shared<RequestHandler>(std::move(handler)))
             .second) {
      return AlreadyExistsError("data plane " + address_ + " already started");
    }
    return OkStatus();
  }

  void Shutdown() override {
    {
      std::lock_guard<std::mutex> lock(RegistryMutex());
      Registry().erase(address_);
    }
    std::map<uint64_t, PendingTable::Entry> cancelled;
    {
      std::lock_guard<std::mutex> lock(pending_->mu);
      if (pending_->stopped) return;
      pending_->stopped = true;
      cancelled.swap(pending_->entries);
    }
    pending_->cv.notify_all();
    if (deadlines_.joinable()) deadlines_.join();
    for (auto& [id, entry] : cancelled) {
      entry.done(CancelledError("data plane " + address_ + " shut down"));
    }
  }

  std::string address() const override { return address_; }

  void Send(const std::string& peer, Message request,
            std::chrono::milliseconds timeout, ResponseCallback done) override {
    std::shared_ptr<RequestHandler> handler;
    {
      std::lock_guard<std::mutex> lock(RegistryMutex());
      auto it = Registry().find(peer);
      if (it != Registry().end()) handler = it->second;
    }
    if (handler == nullptr) {
      done(UnavailableError("no in-process data plane at " + peer));
      return;
    }
    uint64_t id = 0;
    {
      std::lock_guard<std::mutex> lock(pending_->mu);
      if (pending_->stopped) {
        done(CancelledError("data plane " + address_ + " shut down"));
        return;
      }
      id = pending_->next_id++;
      pending_->entries[id] = {Clock::now() + timeout, std::move(done)};
    }
    pending_->cv.notify_all();  // A new, perhaps earliest, deadline.
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
    std::unique_lock<std::mutex> lock(pending_->mu);
    while (!pending_->stopped) {
      if (pending_->entries.empty()) {
        pending_->cv.wait(lock);
        continue;
      }
      auto earliest = pending_->entries.begin();
      for (auto it = pending_->entries.begin(); it != pending_->entries.end();
           ++it) {
        if (it->second.deadline < earliest->second.deadline) earliest = it;
      }
      if (Clock::now() < earliest->second.deadline) {
        pending_->cv.wait_until(lock, earliest->second.deadline);
        continue;
      }
      ResponseCallback done = std::move(earliest->second.done);
      pending_->entries.erase(earliest);
      lock.unlock();
      done(DeadlineExceededError("in-process request not answered in time"));
      lock.lock();
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
