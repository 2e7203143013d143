// Background I/O threads: see background_io.h.
#include "storage/background_io.h"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "common/thread_name.h"

namespace switchyard::storage {
namespace {

// Never destroyed (its threads outlive static destruction; they hold no
// resources but their stacks).
class BackgroundIo {
 public:
  void Run(std::function<void()> task) {
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push_back(std::move(task));
    // Each idle thread takes one task; start another if they are too few.
    if (idle_ < tasks_.size()) {
      StartNamedThread("sy-io", [this] { Loop(); }).detach();
    } else {
      cv_.notify_one();
    }
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      ++idle_;
      cv_.wait(lock, [this] { return !tasks_.empty(); });
      --idle_;
      std::function<void()> task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;  // GUARDED_BY(mu_)
  size_t idle_ = 0;                          // GUARDED_BY(mu_)
};

}  // namespace

void RunInBackground(std::function<void()> task) {
  static BackgroundIo* const io = new BackgroundIo();
  io->Run(std::move(task));
}

}  // namespace switchyard::storage
