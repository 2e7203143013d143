// Background I/O threads: see background_io.h.
#include "storage/background_io.h"

#include <glog/logging.h>

#include <optional>
#include <thread>

#include "common/mutex.h"
#include "common/thread_annotations.h"
#include "common/thread_name.h"
#include "common/work_queue.h"

namespace switchyard::storage {
namespace {

// Never destroyed (its threads outlive static destruction; they hold no
// resources but their stacks), so its queue is never closed.
class BackgroundIo {
 public:
  void Run(std::function<void()> task) EXCLUDES(mu_) {
    bool start_thread = false;
    {
      // Each task claims an idle thread, or starts one when none is left:
      // a task never waits behind a busy thread.
      MutexLock lock(&mu_);
      if (unclaimed_idle_ > 0) {
        --unclaimed_idle_;
      } else {
        start_thread = true;
      }
    }
    std::optional<std::function<void()>> refused = tasks_.Push(std::move(task));
    CHECK(!refused.has_value()) << "the background I/O queue is never closed";
    if (start_thread) {
      StartNamedThread("sy-io", [this] { Loop(); }).detach();
    }
  }

 private:
  void Loop() EXCLUDES(mu_) {
    // NOTE: the task this thread pops need not be the one that claimed it;
    // the counts match (one thread claimed per task queued), which is all
    // that matters.
    while (true) {
      std::optional<std::function<void()>> task = tasks_.Pop();
      CHECK(task.has_value()) << "the background I/O queue is never closed";
      (*task)();
      MutexLock lock(&mu_);
      ++unclaimed_idle_;
    }
  }

  Mutex mu_;
  // Threads that are idle, or about to be, and that no queued task has
  // claimed yet.
  size_t unclaimed_idle_ GUARDED_BY(mu_) = 0;
  WorkQueue<std::function<void()>> tasks_;
};

}  // namespace

void RunInBackground(std::function<void()> task) {
  static BackgroundIo* const io = new BackgroundIo();
  io->Run(std::move(task));
}

}  // namespace switchyard::storage
