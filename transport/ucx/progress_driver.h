// ProgressDriver: who calls UCX, and when. One thread at a time holds the
// "role" (role_mu_) and alone makes UCX calls (the worker is
// UCS_THREAD_MODE_SERIALIZED): the progress thread, or a thread waiting in
// WaitDriving, which drives the network itself until its answers are in
// (the progress thread parks meanwhile), so that an answer reaches its
// waiter without a thread hand-off; a waiter that finds the role free sends
// its requests itself. Other threads Post commands for the role holder and
// wake it only when it sleeps. A role holder polls without sleeping for a
// window after any activity, then sleeps on the worker's event fd. The
// window adapts (NextPollWindow): from busy_poll_us up to max_busy_poll_us
// while traffic keeps coming just after it sleeps, back down while it does
// not.
//
// The owner supplies Hooks for what it keeps (deadlines, work in flight,
// teardown); they run on the role holder.
//
// Thread-safety: Post, OnRoleHolder and WaitDriving are thread-safe; Start
// is called once, before WaitDriving, and Stop from one thread at a time.
// Ownership: the worker is the owner's; the driver's thread calls
// Hooks::stopped last, which may destroy it.
#ifndef SWITCHYARD_TRANSPORT_UCX_PROGRESS_DRIVER_H_
#define SWITCHYARD_TRANSPORT_UCX_PROGRESS_DRIVER_H_

#include <ucp/api/ucp.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <optional>
#include <thread>
#include <vector>

#include "common/mutex.h"
#include "common/thread_annotations.h"

namespace switchyard::transport {

// The polling window after a role holder's sleep of `slept` that was
// `woken` by traffic (or a command) or timed out, given the window
// `current` it slept after: doubled (at most `max_us`) when the traffic
// came within one window of the sleep, which the polling just missed;
// halved (at least `min_us`) when it timed out or slept over 4 windows;
// else the same. With min_us 0 (no polling) it stays 0.
int NextPollWindow(int current, int min_us, int max_us, bool woken,
                   std::chrono::microseconds slept);

class ProgressDriver {
 public:
  using Clock = std::chrono::steady_clock;

  struct Hooks {
    // Completes the requests whose deadlines are past `now`; true when any.
    std::function<bool(Clock::time_point now)> expire;
    // The earliest deadline a sleeping role holder must wake for.
    std::function<Clock::time_point()> next_deadline;
    // Whether anything needs progress without a waiter besides posted
    // commands: requests in flight either way, or peers that may send
    // requests. Runs with the driver's lock held: must not Post.
    std::function<bool()> has_work;
    // The progress thread is stopping and every command has run (later
    // Posts fail): fail what is pending and release UCX.
    std::function<void()> stopped;
  };

  // Polls for busy_poll_us after activity, adapting up to
  // max_busy_poll_us (no more than busy_poll_us: fixed).
  ProgressDriver(int busy_poll_us, int max_busy_poll_us, Hooks hooks);
  // Stops the thread if it still runs.
  ~ProgressDriver();
  ProgressDriver(const ProgressDriver&) = delete;
  ProgressDriver& operator=(const ProgressDriver&) = delete;

  // Starts the progress thread ("sy-ucx") driving `worker`, whose event fd
  // is `efd`; from here on Post accepts commands.
  void Start(ucp_worker_h worker, int efd) EXCLUDES(mu_);
  // Stops the progress thread (it runs what was posted, then
  // Hooks::stopped) and joins it. Idempotent. False when Start never ran
  // (Hooks::stopped did not run: the owner releases UCX itself).
  bool Stop() EXCLUDES(mu_);
  // Stop has been called: requests must not be started any more.
  bool stopping() const { return stop_.load(); }

  // Queues `fn` for the role holder; false (and `fn` dropped) when no
  // progress thread runs commands (not started, or stopped).
  bool Post(std::function<void()> fn) EXCLUDES(mu_);
  // Whether the calling thread is the role holder, awake (a handler
  // replying in place): work for the role holder may run at once.
  bool OnRoleHolder() const {
    return role_holder_.load() == std::this_thread::get_id();
  }

  // DataPlane::SendAndWait's waiting: calls `send(holding_role)` once, with
  // the role (start the requests directly) or without it (Post them), then
  // drives the network, or waits on `cv` while another thread drives, until
  // `done()` (read under `mu`) or `deadline`; returns done(). `mu` is held
  // on entry and return and released meanwhile. Nothing when the driver
  // does not run (not started, or stopped): then `send` has not run.
  std::optional<bool> WaitDriving(const std::function<void(bool)>& send,
                                  Mutex* mu, CondVar* cv,
                                  Clock::time_point deadline,
                                  const std::function<bool()>& done)
      REQUIRES(mu) EXCLUDES(mu_, role_mu_);

 private:
  void Loop() EXCLUDES(mu_, role_mu_);
  // Runs the posted commands. True when there were any.
  bool RunCommands() REQUIRES(role_mu_) EXCLUDES(mu_);
  // Makes sure a role holder runs posted commands soon: signals one sleeping
  // on the worker's fd, or unparks the progress thread when no waiter
  // drives.
  void WakeLocked() REQUIRES(mu_);
  // One round of the role holder's work: posted commands and UCX progress
  // (deadlines are Drive's). True when anything happened. Progress stops
  // early once `finished` (when given) holds: one call can take a whole
  // rendezvous copy (a 16 MiB payload over CMA is about a millisecond), and
  // a waiter whose answer has come sends its next requests before the
  // copies of later answers, so that its peers are not left idle.
  // `*saw_finished` (when given) tells whether it stopped because of it.
  bool Round(const std::function<bool()>* finished = nullptr,
             bool* saw_finished = nullptr) REQUIRES(role_mu_) EXCLUDES(mu_);
  // Drives UCX until `finished()` or `until`, then returns nothing; or,
  // once idle for busy_poll_us, arms the worker, counts itself a sleeper
  // and returns how long to sleep: the caller then releases the role and
  // calls Sleep. `finished()` is checked after every round that did
  // something (only such a round runs callbacks, which is what changes a
  // waiter's state) and every kIdleRoundsPerCheck idle rounds, when the
  // clock, the deadlines and `until` are checked too: an idle round is then
  // a UCX progress call and little else (a clock read here costs 30 ns, a
  // round about as much).
  std::optional<int> Drive(const std::function<bool()>& finished,
                           Clock::time_point until) REQUIRES(role_mu_)
      EXCLUDES(mu_);
  // Waits up to `wait_ms` on the worker's event fd (Drive said to), and
  // adapts the polling window to how the wait ended.
  void Sleep(int wait_ms) EXCLUDES(mu_, role_mu_);
  // A waiter that holds the role is done: the last one wakes the progress
  // thread when work is left for it.
  void LeaveWaitingHoldingRole() REQUIRES(role_mu_) EXCLUDES(mu_);
  // A waiter without the role is done: the last one wakes the progress
  // thread (it cannot tell whether work is left).
  void LeaveWaiting() EXCLUDES(mu_);
  // Counts a waiter out; true when it was the last and commands still run.
  bool LastWaiterLeftLocked() REQUIRES(mu_);
  // Wakes the progress thread, parked or asleep on the worker's fd.
  void UnparkLocked() REQUIRES(mu_);
  // Anything that needs progress without a waiter: commands, or the
  // owner's Hooks::has_work.
  bool HasWorkLocked() const REQUIRES(mu_, role_mu_);

  const std::chrono::microseconds min_poll_;
  const int min_poll_us_, max_poll_us_;
  // The polling window now, in microseconds (NextPollWindow). Sleepers
  // may update it at once; a lost update only changes timing.
  std::atomic<int> poll_us_;
  const Hooks hooks_;
  // Set by Start, before the thread and the first command.
  ucp_worker_h worker_ = nullptr;
  int efd_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false};

  // The role: its holder alone calls UCX.
  Mutex role_mu_;
  // The thread holding the role while awake (replies from it are sent at
  // once, not posted).
  std::atomic<std::thread::id> role_holder_;
  // Commands being run (RunCommands), kept for their capacity.
  std::vector<std::function<void()>> running_ GUARDED_BY(role_mu_);

  mutable Mutex mu_ ACQUIRED_AFTER(role_mu_);
  std::vector<std::function<void()>> commands_ GUARDED_BY(mu_);
  // commands_ is not empty (read without mu_ by the role holder's rounds).
  std::atomic<bool> has_commands_{false};
  // No progress thread runs commands: not started yet, or stopped.
  bool closed_ GUARDED_BY(mu_) = true;
  // Threads in WaitDriving (written under mu_; the progress thread stands
  // back while any).
  std::atomic<int> waiters_{0};
  // Role holders in poll().
  int sleepers_ GUARDED_BY(mu_) = 0;
  // The progress thread stands back.
  bool parked_ GUARDED_BY(mu_) = false;
  bool kicked_ GUARDED_BY(mu_) = false;
  CondVar park_cv_;
};

}  // namespace switchyard::transport

#endif  // SWITCHYARD_TRANSPORT_UCX_PROGRESS_DRIVER_H_
