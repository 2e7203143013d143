// WorkQueue<T>: the queue between the threads that hand work in and the one
// (or few) that do it. Push never blocks; Pop waits for an item or for
// Close. After Close nothing more is accepted, Pop returns what is left and
// then nothing, and Drain hands back the unserved items so that the owner
// can answer each (nothing is dropped silently).
//
// Thread-safety: every method is thread-safe.
#pragma once

#include <chrono>
#include <cstddef>
#include <deque>
#include <optional>
#include <utility>
#include <vector>

#include "common/mutex.h"

namespace switchyard {

template <typename T>
class WorkQueue {
 public:
  WorkQueue() = default;
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  // Appends `item` and returns nothing; once closed, returns `item` for
  // the caller to answer.
  [[nodiscard]] std::optional<T> Push(T item) EXCLUDES(mu_) {
    {
      MutexLock lock(&mu_);
      if (closed_) return item;
      items_.push_back(std::move(item));
    }
    cv_.NotifyOne();
    return std::nullopt;
  }
  // Puts `items` at the front, in their order (work deferred earlier that
  // must run before what came since). Accepted even when closed, so that
  // Drain still answers them.
  void PushFront(std::vector<T> items) EXCLUDES(mu_) {
    {
      MutexLock lock(&mu_);
      for (auto it = items.rbegin(); it != items.rend(); ++it) {
        items_.push_front(std::move(*it));
      }
    }
    cv_.NotifyAll();
  }
  // The oldest item, waiting for one; nothing once closed and (with
  // `finish_after_close` false) at once on Close, leaving the rest to
  // Drain.
  std::optional<T> Pop(bool finish_after_close = false) EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    while (items_.empty() && !closed_) cv_.Wait(&mu_);
    if (items_.empty() || (closed_ && !finish_after_close)) {
      return std::nullopt;
    }
    T item = std::move(items_.front());
    items_.pop_front();
    return item;
  }
  // As Pop, giving up at `deadline`, or at once after an Interrupt (since
  // the last PopUntil that returned).
  template <typename Clock, typename Duration>
  std::optional<T> PopUntil(
      const std::chrono::time_point<Clock, Duration>& deadline) EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    while (items_.empty() && !closed_ && !interrupted_) {
      if (!cv_.WaitUntil(&mu_, deadline)) break;
    }
    interrupted_ = false;
    if (items_.empty() || closed_) return std::nullopt;
    T item = std::move(items_.front());
    items_.pop_front();
    return item;
  }
  // Ends the current or next PopUntil without an item (something besides
  // the queue needs its caller).
  void Interrupt() EXCLUDES(mu_) {
    {
      MutexLock lock(&mu_);
      interrupted_ = true;
    }
    cv_.NotifyAll();
  }
  // Refuses every later Push and wakes every Pop.
  void Close() EXCLUDES(mu_) {
    {
      MutexLock lock(&mu_);
      closed_ = true;
    }
    cv_.NotifyAll();
  }
  // Takes every item still queued.
  std::vector<T> Drain() EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    std::vector<T> left(std::make_move_iterator(items_.begin()),
                        std::make_move_iterator(items_.end()));
    items_.clear();
    return left;
  }
  size_t size() const EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    return items_.size();
  }
  bool closed() const EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    return closed_;
  }

 private:
  mutable Mutex mu_;
  CondVar cv_;
  std::deque<T> items_ GUARDED_BY(mu_);
  bool closed_ GUARDED_BY(mu_) = false;
  bool interrupted_ GUARDED_BY(mu_) = false;
};

}  // namespace switchyard
