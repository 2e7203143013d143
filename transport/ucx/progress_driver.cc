#include "transport/ucx/progress_driver.h"

#include <poll.h>
#include <sched.h>

#include <algorithm>
#include <utility>

#include "common/thread_name.h"

namespace switchyard::transport {
namespace {

// Drive: idle rounds between two looks at the clock (see Drive).
constexpr int kIdleRoundsPerCheck = 16;

}  // namespace

int NextPollWindow(int current, int min_us, int max_us, bool woken,
                   std::chrono::microseconds slept) {
  const auto window = std::chrono::microseconds(current);
  if (woken && slept < window) return std::min(max_us, 2 * current);
  if (!woken || slept > 4 * window) return std::max(min_us, current / 2);
  return current;
}

ProgressDriver::ProgressDriver(int busy_poll_us, int max_busy_poll_us,
                               Hooks hooks)
    : min_poll_(busy_poll_us),
      min_poll_us_(busy_poll_us),
      max_poll_us_(std::max(busy_poll_us, max_busy_poll_us)),
      poll_us_(busy_poll_us),
      hooks_(std::move(hooks)) {}

ProgressDriver::~ProgressDriver() { Stop(); }

void ProgressDriver::Start(ucp_worker_h worker, int efd) {
  worker_ = worker;
  efd_ = efd;
  {
    MutexLock lock(&mu_);
    closed_ = false;
  }
  thread_ = StartNamedThread("sy-ucx", [this] { Loop(); });
}

bool ProgressDriver::Stop() {
  if (!thread_.joinable()) {
    MutexLock lock(&mu_);
    closed_ = true;
    return worker_ != nullptr;  // Started, and stopped before.
  }
  stop_.store(true);
  {
    // The progress thread releases UCX only after setting closed_.
    MutexLock lock(&mu_);
    if (!closed_) ucp_worker_signal(worker_);
    kicked_ = true;
    park_cv_.NotifyAll();
  }
  thread_.join();
  return true;
}

bool ProgressDriver::Post(std::function<void()> fn) {
  MutexLock lock(&mu_);
  if (closed_) return false;
  commands_.push_back(std::move(fn));
  has_commands_.store(true, std::memory_order_release);
  WakeLocked();
  return true;
}

bool ProgressDriver::RunCommands() {
  if (!has_commands_.load(std::memory_order_acquire)) return false;
  {
    MutexLock lock(&mu_);
    running_.swap(commands_);
    has_commands_.store(false, std::memory_order_relaxed);
  }
  for (auto& c : running_) c();
  const bool ran = !running_.empty();
  running_.clear();
  return ran;
}

void ProgressDriver::WakeLocked() {
  // Signal under mu_: the worker is destroyed only after closed_.
  if (sleepers_ > 0) {
    ucp_worker_signal(worker_);
  } else if (parked_ && waiters_.load() == 0) {
    kicked_ = true;
    park_cv_.NotifyOne();
  }
  // Otherwise a role holder is awake (it runs commands every round; one
  // about to sleep checks for them under mu_ first) or a waiter is about
  // to drive.
}

bool ProgressDriver::Round(const std::function<bool()>* finished,
                           bool* saw_finished) {
  bool active = RunCommands();
  while (ucp_worker_progress(worker_) != 0) {
    active = true;
    if (finished != nullptr && (*finished)()) {
      if (saw_finished != nullptr) *saw_finished = true;
      break;
    }
  }
  return active;
}

std::optional<int> ProgressDriver::Drive(const std::function<bool()>& finished,
                                         Clock::time_point until) {
  auto last_activity = Clock::now();
  int idle_rounds = 0;
  role_holder_.store(std::this_thread::get_id());
  while (true) {
    bool saw_finished = false;
    bool active = Round(&finished, &saw_finished);
    if (saw_finished) break;  // An answer came: no clock read on its way.
    if (!active && ++idle_rounds < kIdleRoundsPerCheck) continue;
    idle_rounds = 0;
    const auto now = Clock::now();
    active = hooks_.expire(now) || active;
    if (finished()) break;
    if (now >= until) break;
    if (active) last_activity = now;
    const auto idle = now - last_activity;
    if (idle <
        std::chrono::microseconds(poll_us_.load(std::memory_order_relaxed))) {
      // Past busy_poll_us, the polling the window adapted to gives the
      // core to any other thread that wants it.
      if (idle >= min_poll_) ::sched_yield();
      continue;
    }
    if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
    {
      MutexLock lock(&mu_);
      if (!commands_.empty()) continue;
      ++sleepers_;
    }
    auto wake = std::min(until, now + std::chrono::milliseconds(100));
    wake = std::min(wake, hooks_.next_deadline());
    const int wait_ms = std::clamp<int>(
        static_cast<int>(
            std::chrono::duration_cast<std::chrono::milliseconds>(wake - now)
                .count()) +
            1,
        0, 100);
    role_holder_.store(std::thread::id());
    return wait_ms;
  }
  role_holder_.store(std::thread::id());
  return std::nullopt;
}

void ProgressDriver::Sleep(int wait_ms) {
  pollfd pfd{efd_, POLLIN, 0};
  const auto start = Clock::now();
  const bool woken = ::poll(&pfd, 1, wait_ms) > 0;
  poll_us_.store(
      NextPollWindow(poll_us_.load(std::memory_order_relaxed), min_poll_us_,
                     max_poll_us_, woken,
                     std::chrono::duration_cast<std::chrono::microseconds>(
                         Clock::now() - start)),
      std::memory_order_relaxed);
  MutexLock lock(&mu_);
  --sleepers_;
}

void ProgressDriver::Loop() {
  // The progress thread parks while a waiter drives. When the last waiter
  // leaves work behind (HasWorkLocked) it unparks the thread; otherwise
  // the thread looks for stray events (a new connection, say) on its own,
  // without arming the worker, every park_for, doubling while idle: an
  // armed worker would wake it for every event of the next waiter's round
  // trips, on the core that the round trip's other end needs.
  constexpr auto kParkMin = std::chrono::milliseconds(1);
  constexpr auto kParkMax = std::chrono::milliseconds(64);
  auto park_for = kParkMin;
  bool look_only = false;
  while (!stop_.load()) {
    {
      MutexLock lock(&mu_);
      if (waiters_.load() > 0 || look_only) {
        parked_ = true;
        const auto until = Clock::now() + park_for;
        while (!kicked_ && !stop_.load()) {
          if (!park_cv_.WaitUntil(&mu_, until)) break;
        }
        const bool kicked = kicked_ || stop_.load();
        parked_ = kicked_ = false;
        if (kicked) {
          look_only = false;
          park_for = kParkMin;
        } else {
          look_only = true;
          park_for = std::min(park_for * 2, kParkMax);
        }
        if (waiters_.load() > 0) continue;
      }
    }
    if (!role_mu_.TryLock()) {  // A waiter on its way out.
      ::sched_yield();
      continue;
    }
    if (look_only) {
      Round();
      hooks_.expire(Clock::now());
      bool has_work = false;
      {
        MutexLock lock(&mu_);
        has_work = HasWorkLocked();
      }
      if (!has_work) {
        role_mu_.Unlock();
        continue;
      }
      look_only = false;
      park_for = kParkMin;
    }
    const std::optional<int> sleep_ms =
        Drive([this] { return stop_.load() || waiters_.load() > 0; },
              Clock::time_point::max());
    role_mu_.Unlock();
    if (sleep_ms) Sleep(*sleep_ms);
    // Else a waiter arrived: it drives and this thread parks (look_only
    // stays false: the last waiter unparks it when work is left).
  }
  MutexLock role(&role_mu_);
  // Stopping: run what was posted (requests see stop_ and are cancelled),
  // refuse further posts, then let the owner fail what is pending and
  // release UCX.
  while (true) {
    {
      MutexLock lock(&mu_);
      if (commands_.empty()) {
        closed_ = true;
        break;
      }
    }
    RunCommands();
  }
  hooks_.stopped();
}

bool ProgressDriver::HasWorkLocked() const {
  return !commands_.empty() || hooks_.has_work();
}

bool ProgressDriver::LastWaiterLeftLocked() {
  return waiters_.fetch_sub(1) == 1 && !closed_;
}

void ProgressDriver::UnparkLocked() {
  if (sleepers_ > 0) ucp_worker_signal(worker_);
  kicked_ = true;
  park_cv_.NotifyOne();
}

void ProgressDriver::LeaveWaitingHoldingRole() {
  MutexLock lock(&mu_);
  if (LastWaiterLeftLocked() && HasWorkLocked()) UnparkLocked();
}

void ProgressDriver::LeaveWaiting() {
  MutexLock lock(&mu_);
  if (LastWaiterLeftLocked()) UnparkLocked();
}

std::optional<bool> ProgressDriver::WaitDriving(
    const std::function<void(bool)>& send, Mutex* mu, CondVar* cv,
    Clock::time_point deadline, const std::function<bool()>& done) {
  // While the role holder is busy (the progress thread finishing a round),
  // retry this long, giving the core away between tries, before waiting
  // on `cv` for a while between tries (another waiter drives).
  constexpr auto kRoleSpin = std::chrono::microseconds(50);
  constexpr auto kRoleRetry = std::chrono::microseconds(200);
  mu->Unlock();
  bool running = false;
  {
    // From here on posted commands need no wake-up: this thread runs them.
    MutexLock lock(&mu_);
    running = !closed_;
    if (running) waiters_.fetch_add(1);
  }
  if (!running) {
    mu->Lock();
    return std::nullopt;
  }
  bool sent = false;
  std::optional<Clock::time_point> spin_until;  // Read when first needed.
  while (true) {
    if (role_mu_.TryLock()) {
      if (!sent) {
        // Holding the role, send directly instead of posting commands
        // (each a closure and a queue entry); what was posted before goes
        // first, so that requests from one thread keep their order.
        RunCommands();
        send(/*holding_role=*/true);
        sent = true;
      }
      bool finished = stop_.load();
      std::optional<int> sleep_ms;
      if (!finished) {
        sleep_ms = Drive(
            [&] {
              MutexLock relock(mu);
              finished = stop_.load() || done();
              return finished;
            },
            deadline);
      }
      if (finished) {
        LeaveWaitingHoldingRole();
        role_mu_.Unlock();
        mu->Lock();
        if (!stop_.load()) return done();
        // Shutting down completes every request.
        while (!done()) {
          if (!cv->WaitUntil(mu, deadline)) return done();
        }
        return true;
      }
      role_mu_.Unlock();
      if (sleep_ms) {  // Idle: it slept on the worker's fd.
        Sleep(*sleep_ms);
        continue;
      }
      // Past the deadline.
    } else if (!sent) {
      send(/*holding_role=*/false);
      sent = true;
      continue;  // The role may be free by now.
    }
    mu->Lock();
    const auto now = Clock::now();
    if (done() || now >= deadline) {
      LeaveWaiting();
      return done();
    }
    if (!spin_until) spin_until = now + kRoleSpin;
    if (now < *spin_until) {
      mu->Unlock();
      ::sched_yield();
      continue;
    }
    cv->WaitUntil(mu, std::min(deadline, now + kRoleRetry));
    mu->Unlock();
  }
}

}  // namespace switchyard::transport
