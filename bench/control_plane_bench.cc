// bench/control_plane: the coordinator's control plane under many members.
// Starts the real coordinator (`switchyard coordinator --fresh`) as a child
// process, with a model of 258 shards (4 MoE layers of 64 experts, and the
// dense part), and --members simulated expert workers in this process:
// MemberSessions over real TCP connections, all on one io_context
// (--io-threads threads), registering in waves of --register-batch and
// heartbeating every --heartbeat-ms.
//
//   registration: members registered per second, per wave and overall, and
//                 the routing tables the members received meanwhile (a
//                 spare's registration pushes none; the first placement
//                 pushes one to every member).
//   heartbeats:   for --seconds once the first placement reached every
//                 member, heartbeats acknowledged per second and the
//                 coordinator's CPU time (utime + stime of /proc/<pid>/stat):
//                 CPU per heartbeat, heartbeats per coordinator core-second.
//   failover:     a worker that holds shards drops its connection without
//                 Leave; the time until another member holds a routing table
//                 of a newer epoch with no shard on it (the coordinator cuts
//                 a closed member's lease to two heartbeat periods, then
//                 fences it at its next tick).
// Verifies while timing: every member registered once (none fenced), every
// member received the placed table with every shard placed, every member was
// acknowledged in the window, and the failover table places every shard on
// a live worker.
// Targets (docs/performance.md): >= 20000 heartbeats/s per coordinator core;
// death to new routing table <= cluster.lease_ms + 100 ms.
// Exit status: 0 targets met, 3 a target missed, 1 a failure, 2 bad flags.
#include <fcntl.h>
#include <glog/logging.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/asio.hpp>
#include <chrono>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/config.h"
#include "common/flags.h"
#include "common/logging.h"
#include "common/model_shape.h"
#include "common/mutex.h"
#include "common/net_address.h"
#include "common/status.h"
#include "transport/control/auth.h"
#include "transport/control/member_session.h"

namespace switchyard::control {
namespace {

using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

// Descriptors kept free beside one connection per member (the coordinator,
// which inherits the limit, needs as many).
constexpr int64_t kSpareDescriptors = 64;
// Worker capacity: far more than the model needs, so that any one worker
// could hold it all.
constexpr int64_t kCapacityBytes = int64_t{1} << 40;
constexpr auto kCoordinatorStartTimeout = std::chrono::seconds(30);
constexpr auto kCoordinatorStopTimeout = std::chrono::seconds(5);
constexpr auto kPlacementTimeout = std::chrono::seconds(60);
// How often a long wait for registrations says how far it got.
constexpr Ms kProgressPeriod{5000};

struct BenchOptions {
  int64_t members = 2048;
  int64_t seconds = 10;
  // 2,048 members heartbeating every 100 ms offer 20,480 heartbeats/s;
  // the lease is the default (cluster.lease_ms).
  int64_t heartbeat_ms = 100;
  int64_t lease_ms = 3000;
  int64_t call_timeout_ms = 10000;
  int64_t io_threads = 2;
  int64_t register_batch = 64;
  int64_t register_timeout_s = 600;
  std::string binary;
};

double SecondsOf(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

Ms Remaining(Clock::time_point deadline) {
  return std::max(Ms(0),
                  std::chrono::duration_cast<Ms>(deadline - Clock::now()));
}

std::string MemberName(int i) {
  char name[16];
  std::snprintf(name, sizeof(name), "sim-%04d", i);
  return name;
}

// This process's user + system CPU time, in seconds.
double SelfCpuSeconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  auto seconds = [](const timeval& t) { return t.tv_sec + t.tv_usec / 1e6; };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

// Raises the soft limit on open files to the hard limit; fails unless
// `needed` descriptors are then allowed.
Status RaiseDescriptorLimit(int64_t needed) {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) {
    return InternalError("getrlimit(RLIMIT_NOFILE) failed");
  }
  limit.rlim_cur = limit.rlim_max;
  if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) {
    return InternalError("setrlimit(RLIMIT_NOFILE) to the hard limit failed");
  }
  if (limit.rlim_cur != RLIM_INFINITY &&
      static_cast<int64_t>(limit.rlim_cur) < needed) {
    return ResourceExhaustedError("--members needs " + std::to_string(needed) +
                                  " open files (one connection per member + " +
                                  std::to_string(kSpareDescriptors) +
                                  "), but the hard limit (ulimit -Hn) is " +
                                  std::to_string(limit.rlim_cur) +
                                  ": raise it or pass fewer --members");
  }
  return OkStatus();
}

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it
// on destruction.
class TempDir {
 public:
  TempDir() = default;
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    if (path_.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }

  Status Create() {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern =
        std::string(tmp && *tmp ? tmp : "/tmp") + "/control_plane_bench.XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      return UnavailableError("mkdtemp " + pattern + " failed");
    }
    path_ = pattern;
    return OkStatus();
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The coordinator as a child process, its output in a log file. Stopped
// (SIGTERM, then SIGKILL) on destruction; it is also killed if this process
// dies first. Not thread-safe.
class CoordinatorProcess {
 public:
  CoordinatorProcess() = default;
  CoordinatorProcess(const CoordinatorProcess&) = delete;
  CoordinatorProcess& operator=(const CoordinatorProcess&) = delete;
  ~CoordinatorProcess() { Stop(); }

  Status Start(const std::string& binary, const std::string& config_path,
               const std::string& log_path) {
    log_path_ = log_path;
    std::vector<std::string> args = {binary, "coordinator", "--config",
                                     config_path, "--fresh"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const int log_fd = ::open(log_path.c_str(),
                              O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (log_fd < 0) return UnavailableError("cannot create " + log_path);
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) {
      ::close(log_fd);
      return UnavailableError("fork failed");
    }
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);  // The bench died already.
      ::dup2(log_fd, STDOUT_FILENO);
      ::dup2(log_fd, STDERR_FILENO);
      ::execv(binary.c_str(), argv.data());
      ::_exit(127);
    }
    ::close(log_fd);
    pid_ = pid;
    return OkStatus();
  }

  // Polls `addr_file` until the coordinator has written its address there.
  StatusOr<HostPort> WaitAddress(const std::string& addr_file,
                                 Clock::time_point deadline) {
    while (true) {
      std::string line;
      std::ifstream in(addr_file);
      if (in && std::getline(in, line) && !line.empty()) {
        return ParseHostPort(line);
      }
      RETURN_IF_ERROR(CheckRunning());
      if (Clock::now() >= deadline) {
        return DeadlineExceededError("the coordinator wrote no " + addr_file +
                                     " in time" + LogTail());
      }
      std::this_thread::sleep_for(Ms(20));
    }
  }

  // OK while the coordinator runs; else how it ended and its last log lines.
  Status CheckRunning() {
    if (pid_ <= 0) return UnavailableError("the coordinator is not running");
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) != pid_) return OkStatus();
    pid_ = -1;
    return UnavailableError(
        std::string("the coordinator ended (") +
        (WIFEXITED(status) ? "exit " + std::to_string(WEXITSTATUS(status))
                           : "signal " + std::to_string(WTERMSIG(status))) +
        ")" + LogTail());
  }

  // The coordinator's user + system CPU time so far, in seconds.
  StatusOr<double> CpuSeconds() const {
    const std::string path = "/proc/" + std::to_string(pid_) + "/stat";
    std::ifstream in(path);
    std::string text((std::istreambuf_iterator<char>(in)),
                     std::istreambuf_iterator<char>());
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    const size_t close = text.rfind(')');
    if (close == std::string::npos)
      return UnavailableError("cannot read " + path);
    std::istringstream fields(text.substr(close + 1));
    std::vector<std::string> f;
    for (std::string s; fields >> s;) f.push_back(s);
    if (f.size() < 13) return UnavailableError("cannot parse " + path);
    const double ticks = static_cast<double>(::sysconf(_SC_CLK_TCK));
    return (std::stod(f[11]) + std::stod(f[12])) / ticks;
  }

  void Stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    const auto deadline = Clock::now() + kCoordinatorStopTimeout;
    int status = 0;
    while (::waitpid(pid_, &status, WNOHANG) == 0) {
      if (Clock::now() >= deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(Ms(10));
    }
    pid_ = -1;
  }

  pid_t pid() const { return pid_; }

  // The log's last lines, for error messages.
  std::string LogTail() const {
    std::ifstream in(log_path_);
    std::deque<std::string> lines;
    for (std::string line; std::getline(in, line);) {
      lines.push_back(line);
      if (lines.size() > 15) lines.pop_front();
    }
    if (lines.empty()) return "; its log is empty";
    std::string out = "; the end of its log:";
    for (const auto& line : lines) out += "\n    " + line;
    return out;
  }

 private:
  pid_t pid_ = -1;
  std::string log_path_;
};

// What the members' callbacks see, counted on the io_context threads and
// read by the main thread.
class Observations {
 public:
  explicit Observations(int num_members)
      : acks_by_member_(num_members), placed_epoch_by_member_(num_members) {}

  void OnRegistered() { registrations_.fetch_add(1); }
  void OnHeartbeatAck(int member) { acks_by_member_[member].fetch_add(1); }
  void OnRouting(int member, const RoutingTable& table) {
    const auto now = Clock::now();
    tables_.fetch_add(1);
    table_worker_rows_.fetch_add(table.workers_size());
    if (table.entries_size() > 0) {
      placed_epoch_by_member_[member].store(table.epoch());
    }
    if (!watching_.load()) return;
    MutexLock lock(&mu_);
    if (member == dead_member_ || replaced_at_ ||
        table.epoch() <= watched_epoch_) {
      return;
    }
    for (const auto& e : table.entries()) {
      if (e.worker() >= 0 && e.worker() < table.workers_size() &&
          table.workers(e.worker()).name() == dead_) {
        return;
      }
    }
    replaced_at_ = now;
    replacement_ = table;
    replacement_seen_by_ = member;
    cv_.NotifyAll();
  }

  uint64_t registrations() const { return registrations_.load(); }
  uint64_t tables() const { return tables_.load(); }
  uint64_t table_worker_rows() const { return table_worker_rows_.load(); }
  uint64_t acks(int member) const { return acks_by_member_[member].load(); }
  uint64_t placed_epoch(int member) const {
    return placed_epoch_by_member_[member].load();
  }

  // From now on, notes the first table of an epoch after `epoch` that a
  // member other than `member` (named `name`) receives with no shard on it.
  void Watch(int member, const std::string& name, uint64_t epoch) {
    MutexLock lock(&mu_);
    dead_member_ = member;
    dead_ = name;
    watched_epoch_ = epoch;
    watching_.store(true);
  }
  // When that table arrived, the table and who received it; nullopt if none
  // came by `deadline`.
  std::optional<Clock::time_point> WaitReplacement(Clock::time_point deadline,
                                                   RoutingTable* table,
                                                   int* seen_by) {
    MutexLock lock(&mu_);
    while (!replaced_at_) {
      if (!cv_.WaitUntil(&mu_, deadline)) break;
    }
    if (replaced_at_) {
      *table = replacement_;
      *seen_by = replacement_seen_by_;
    }
    return replaced_at_;
  }

 private:
  std::atomic<uint64_t> registrations_{0};
  std::atomic<uint64_t> tables_{0};
  std::atomic<uint64_t> table_worker_rows_{0};
  std::vector<std::atomic<uint64_t>> acks_by_member_;
  // The epoch of the newest table with entries (a placement) each received.
  std::vector<std::atomic<uint64_t>> placed_epoch_by_member_;

  std::atomic<bool> watching_{false};
  Mutex mu_;
  CondVar cv_;
  int dead_member_ GUARDED_BY(mu_) = -1;
  std::string dead_ GUARDED_BY(mu_);
  uint64_t watched_epoch_ GUARDED_BY(mu_) = 0;
  std::optional<Clock::time_point> replaced_at_ GUARDED_BY(mu_);
  RoutingTable replacement_ GUARDED_BY(mu_);
  int replacement_seen_by_ GUARDED_BY(mu_) = -1;
};

// The simulated workers: MemberSessions sharing one io_context run by
// `io_threads` threads. Shutdown (or destruction) closes every session
// without Leave. Start, Kill and Shutdown run on the main thread only.
class Fleet {
 public:
  Fleet(int num_members, int io_threads) : seen_(num_members) {
    for (int t = 0; t < io_threads; ++t) {
      threads_.emplace_back([this] { io_.run(); });
    }
    sessions_.resize(num_members);
  }
  Fleet(const Fleet&) = delete;
  Fleet& operator=(const Fleet&) = delete;
  ~Fleet() { Shutdown(); }

  // Creates and starts member `i` as worker sim-<i>.
  void Start(int i, MemberSessionOptions options) {
    options.on_registered = [this](const RegisterResponse&) {
      seen_.OnRegistered();
    };
    options.on_heartbeat_ack = [this, i](const HeartbeatAck&) {
      seen_.OnHeartbeatAck(i);
    };
    sessions_[i] = MemberSession::Create(
        io_, std::move(options),
        [this, i](const RoutingTable& table) { seen_.OnRouting(i, table); });
    sessions_[i]->Start();
  }

  MemberSession& member(int i) { return *sessions_[i]; }
  Observations& seen() { return seen_; }

  // Member `i` stops heartbeating and closes its connection, as a crashed
  // process's would be closed.
  void Kill(int i) { sessions_[i]->Shutdown(/*leave=*/false); }

  void Shutdown() {
    if (threads_.empty()) return;
    for (auto& s : sessions_) {
      if (s) s->Shutdown(/*leave=*/false);
    }
    work_.reset();
    // Everything is cancelled: run() returns once the cancellations ran.
    const auto deadline = Clock::now() + std::chrono::seconds(5);
    while (!io_.stopped() && Clock::now() < deadline) {
      std::this_thread::sleep_for(Ms(10));
    }
    io_.stop();
    for (auto& t : threads_) t.join();
    threads_.clear();
    sessions_.clear();  // Before io_, whose services their timers use.
  }

 private:
  boost::asio::io_context io_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type>
      work_ = boost::asio::make_work_guard(io_);
  Observations seen_;
  std::vector<std::thread> threads_;
  std::vector<MemberSession::Ptr> sessions_;
};

std::string ConfigYaml(const BenchOptions& o, const std::string& dir) {
  std::ostringstream y;
  y << "cluster:\n"
    << "  coordinator_address: 127.0.0.1:0\n"
    << "  state_dir: " << dir << "/state\n"
    << "  secret_file: " << dir << "/secret\n"
    << "  workers: " << o.members << "\n"
    << "  trainers: 1\n"
    << "  heartbeat_ms: " << o.heartbeat_ms << "\n"
    << "  lease_ms: " << o.lease_ms << "\n"
    << "  call_timeout_ms: " << o.call_timeout_ms << "\n"
    << "  worker_capacity_bytes: " << kCapacityBytes << "\n"
    << "model:\n"
    << "  num_layers: 8\n"
    << "  moe_every: 2\n"
    << "  num_experts: 64\n"
    << "  d_model: 64\n"
    << "  d_ff: 128\n";
  return y.str();
}

MemberSessionOptions MemberOptions(const BenchOptions& o,
                                   const HostPort& coordinator,
                                   const std::string& secret, int i) {
  MemberSessionOptions options;
  options.client.server = coordinator;
  options.client.control.secret = secret;
  options.client.control.handshake_timeout = Ms(o.call_timeout_ms);
  options.registration.set_kind(WORKER);
  options.registration.set_name(MemberName(i));
  options.registration.set_data_address("127.0.0.1:" +
                                        std::to_string(1000 + i));
  options.registration.set_capacity_bytes(kCapacityBytes);
  options.registration.set_device("cpu");
  options.registration.set_rank(-1);
  options.registration.set_pid(static_cast<int32_t>(::getpid()));
  options.registration.set_host("127.0.0.1");
  options.heartbeat_period = Ms(o.heartbeat_ms);
  options.call_timeout = Ms(o.call_timeout_ms);
  return options;
}

// Empty when `table` places all `num_shards` shards on its workers and none
// on `dead`; else what is wrong.
std::string CheckTable(const RoutingTable& table, int num_shards,
                       const std::string& dead) {
  if (table.entries_size() != num_shards) {
    return "the table has " + std::to_string(table.entries_size()) +
           " entries, the model " + std::to_string(num_shards) + " shards";
  }
  for (const auto& w : table.workers()) {
    if (w.name() == dead) return "it still lists " + dead;
  }
  for (const auto& e : table.entries()) {
    if (e.worker() < 0 || e.worker() >= table.workers_size()) {
      return "a shard is unplaced (" + table.placement_error() + ")";
    }
  }
  return "";
}

// Registers every member, in waves of --register-batch, printing progress.
Status RegisterAll(const BenchOptions& o, const HostPort& coordinator,
                   const std::string& secret, CoordinatorProcess* process,
                   Fleet* fleet) {
  const int n = static_cast<int>(o.members);
  std::printf("registration: %d workers in waves of %lld\n", n,
              static_cast<long long>(o.register_batch));
  std::fflush(stdout);
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::seconds(o.register_timeout_s);
  for (int first = 0; first < n;) {
    const int end =
        static_cast<int>(std::min<int64_t>(n, first + o.register_batch));
    const auto wave_start = Clock::now();
    const uint64_t tables_before = fleet->seen().tables();
    ASSIGN_OR_RETURN(const double cpu_before, process->CpuSeconds());
    const double self_before = SelfCpuSeconds();
    for (int i = first; i < end; ++i) {
      fleet->Start(i, MemberOptions(o, coordinator, secret, i));
    }
    for (int i = first; i < end; ++i) {
      Status s = fleet->member(i).WaitRegistered(
          std::min(Remaining(deadline), kProgressPeriod));
      while (!s.ok() && Clock::now() < deadline) {
        std::printf("  ... %7.2f s  waiting for %s (%d of %d registered)\n",
                    SecondsOf(Clock::now() - start), MemberName(i).c_str(), i,
                    n);
        std::fflush(stdout);
        RETURN_IF_ERROR(process->CheckRunning());
        s = fleet->member(i).WaitRegistered(
            std::min(Remaining(deadline), kProgressPeriod));
      }
      if (!s.ok()) {
        RETURN_IF_ERROR(process->CheckRunning());
        return s.WithContext(MemberName(i) + " (" + std::to_string(i) + " of " +
                             std::to_string(n) +
                             " registered; --register-timeout-s " +
                             std::to_string(o.register_timeout_s) + ")");
      }
    }
    const double wave_s = SecondsOf(Clock::now() - wave_start);
    ASSIGN_OR_RETURN(const double cpu_after, process->CpuSeconds());
    std::printf(
        "  %5d/%d registered  %7.2f s  this wave: %8.1f members/s, %6llu "
        "routing tables delivered, CPU: coordinator %.2f s, bench %.2f s\n",
        end, n, SecondsOf(Clock::now() - start), (end - first) / wave_s,
        static_cast<unsigned long long>(fleet->seen().tables() - tables_before),
        cpu_after - cpu_before, SelfCpuSeconds() - self_before);
    std::fflush(stdout);
    first = end;
  }
  const double total_s = SecondsOf(Clock::now() - start);
  std::printf("  all %d in %.2f s: %.1f members/s\n", n, total_s, n / total_s);
  if (fleet->seen().registrations() != static_cast<uint64_t>(n)) {
    return InternalError(
        "VERIFY FAILED: " + std::to_string(fleet->seen().registrations()) +
        " registrations for " + std::to_string(n) +
        " members (some were fenced and came back)");
  }
  return OkStatus();
}

// Waits until every member holds a placed table; returns member 0's.
StatusOr<RoutingTable> WaitPlacement(int n, int num_shards,
                                     CoordinatorProcess* process,
                                     Fleet* fleet) {
  const auto start = Clock::now();
  const auto deadline = start + kPlacementTimeout;
  for (int i = 0; i < n; ++i) {
    while (fleet->seen().placed_epoch(i) == 0) {
      RETURN_IF_ERROR(process->CheckRunning());
      if (Clock::now() >= deadline) {
        return DeadlineExceededError(
            MemberName(i) + " received no placed routing table within " +
            std::to_string(kPlacementTimeout.count()) +
            " s of the last registration");
      }
      std::this_thread::sleep_for(Ms(5));
    }
  }
  RoutingTable table = fleet->member(0).routing();
  if (std::string why = CheckTable(table, num_shards, ""); !why.empty()) {
    return InternalError("VERIFY FAILED: first placement: " + why);
  }
  std::printf(
      "first placement: epoch %llu, %d shards over %d workers, in every "
      "member's hands %.1f ms after the last registration\n",
      static_cast<unsigned long long>(table.epoch()), table.entries_size(),
      table.workers_size(), SecondsOf(Clock::now() - start) * 1e3);
  // Each registration pushes the whole table to every member registered by
  // then: up to N(N+1)/2 pushes, plus the N responses.
  std::printf(
      "  routing tables delivered so far: %llu (at most N(N+1)/2 + N = %.0f), "
      "%llu worker rows in them\n",
      static_cast<unsigned long long>(fleet->seen().tables()),
      static_cast<double>(n) * (n + 1) / 2 + n,
      static_cast<unsigned long long>(fleet->seen().table_worker_rows()));
  return table;
}

// The heartbeat window; sets *met to whether the target was met.
Status MeasureHeartbeats(const BenchOptions& o, CoordinatorProcess* process,
                         Fleet* fleet, bool* met) {
  const int n = static_cast<int>(o.members);
  std::vector<uint64_t> before(n);
  for (int i = 0; i < n; ++i) before[i] = fleet->seen().acks(i);
  const uint64_t tables_before = fleet->seen().tables();
  ASSIGN_OR_RETURN(const double cpu_before, process->CpuSeconds());
  const double self_before = SelfCpuSeconds();
  const auto start = Clock::now();
  std::this_thread::sleep_for(std::chrono::seconds(o.seconds));
  const double window_s = SecondsOf(Clock::now() - start);
  RETURN_IF_ERROR(process->CheckRunning());
  ASSIGN_OR_RETURN(const double cpu_after, process->CpuSeconds());
  const double self_s = SelfCpuSeconds() - self_before;
  uint64_t acks = 0;
  int silent = 0;
  for (int i = 0; i < n; ++i) {
    const uint64_t d = fleet->seen().acks(i) - before[i];
    acks += d;
    silent += d == 0;
  }
  const double cpu_s = cpu_after - cpu_before;
  const double expected = n * 1000.0 / o.heartbeat_ms;
  const double rate = acks / window_s;
  const double per_core = cpu_s > 0 ? acks / cpu_s : 0;
  *met = per_core >= 20000;
  std::printf(
      "heartbeats: %d members every %lld ms for %.1f s (expected %.0f/s)\n", n,
      static_cast<long long>(o.heartbeat_ms), window_s, expected);
  std::printf(
      "  acknowledged:         %10.0f/s  (%.2f of expected; %llu acks)\n", rate,
      rate / expected, static_cast<unsigned long long>(acks));
  std::printf("  coordinator CPU:      %10.3f s   (%.2f cores)\n", cpu_s,
              cpu_s / window_s);
  std::printf("  CPU per heartbeat:    %10.2f us\n",
              acks > 0 ? cpu_s * 1e6 / acks : 0.0);
  std::printf(
      "  bench process CPU:    %10.3f s   (%.2f cores: the members' side)\n",
      self_s, self_s / window_s);
  std::printf(
      "  routing tables delivered in the window: %llu\n",
      static_cast<unsigned long long>(fleet->seen().tables() - tables_before));
  std::printf("  heartbeats/s per core: %.0f (target >= 20000: %s)\n", per_core,
              *met ? "met" : "NOT met");
  if (cpu_s <= 0) {
    std::printf(
        "  (the coordinator used less CPU than one clock tick: run "
        "longer or with more members)\n");
  }
  if (silent > 0) {
    return InternalError(
        "VERIFY FAILED: " + std::to_string(silent) +
        " members had no heartbeat acknowledged in the window");
  }
  return OkStatus();
}

// Kills a worker that holds shards and times the routing table without it;
// sets *met to whether the target was met.
Status MeasureFailover(const BenchOptions& o, int num_shards,
                       CoordinatorProcess* process, Fleet* fleet, bool* met) {
  const RoutingTable current = fleet->member(0).routing();
  int victim = -1;
  std::string victim_name;
  int held = 0;
  for (const auto& e : current.entries()) {
    if (e.worker() < 0) continue;
    const std::string& name = current.workers(e.worker()).name();
    if (victim < 0) {
      victim_name = name;
      victim = std::stoi(name.substr(name.find('-') + 1));
    }
    held += name == victim_name;
  }
  if (victim < 0) return InternalError("no worker holds a shard");
  fleet->seen().Watch(victim, victim_name, current.epoch());
  const auto death = Clock::now();
  fleet->Kill(victim);
  const auto deadline = death + Ms(3 * o.lease_ms) + std::chrono::seconds(10);
  RoutingTable table;
  int seen_by = -1;
  std::optional<Clock::time_point> replaced;
  while (!replaced && Clock::now() < deadline) {
    RETURN_IF_ERROR(process->CheckRunning());
    replaced = fleet->seen().WaitReplacement(
        std::min(deadline, Clock::now() + Ms(100)), &table, &seen_by);
  }
  std::printf(
      "failover: %s (holding %d shards) drops its connection without "
      "Leave\n",
      victim_name.c_str(), held);
  if (!replaced) {
    *met = false;
    return DeadlineExceededError("no member received a routing table without " +
                                 victim_name + " within " +
                                 std::to_string(static_cast<int64_t>(
                                     SecondsOf(deadline - death) * 1e3)) +
                                 " ms");
  }
  const double ms = SecondsOf(*replaced - death) * 1e3;
  const int64_t target_ms = o.lease_ms + 100;
  *met = ms <= target_ms;
  std::printf(
      "  new table: epoch %llu -> %llu, first seen by %s; expected about "
      "2 heartbeats + a tick = %lld ms\n",
      static_cast<unsigned long long>(current.epoch()),
      static_cast<unsigned long long>(table.epoch()),
      MemberName(seen_by).c_str(),
      static_cast<long long>(2 * o.heartbeat_ms +
                             std::max<int64_t>(10, o.lease_ms / 20)));
  std::printf(
      "  death to new routing table: %.1f ms (target <= lease + 100 = "
      "%lld ms: %s)\n",
      ms, static_cast<long long>(target_ms), *met ? "met" : "NOT met");
  if (std::string why = CheckTable(table, num_shards, victim_name);
      !why.empty()) {
    return InternalError("VERIFY FAILED: failover table: " + why);
  }
  return OkStatus();
}

// Exit status: 0 targets met, 3 a target missed, 1 a failure.
int Run(const BenchOptions& o) {
  const int n = static_cast<int>(o.members);
  if (Status s = RaiseDescriptorLimit(o.members + kSpareDescriptors); !s.ok()) {
    std::fprintf(stderr, "control_plane_bench: %s\n", s.message().c_str());
    return 1;
  }
  if (::access(o.binary.c_str(), X_OK) != 0) {
    std::fprintf(stderr,
                 "control_plane_bench: no switchyard binary at %s (build the "
                 "switchyard target or pass --binary)\n",
                 o.binary.c_str());
    return 1;
  }
  TempDir dir;
  CoordinatorProcess coordinator;
  std::optional<Fleet> fleet;
  bool heartbeats_met = false, failover_met = false;
  Status s = [&]() -> Status {
    RETURN_IF_ERROR(dir.Create());
    const std::string yaml = ConfigYaml(o, dir.path());
    ASSIGN_OR_RETURN(LoadedConfig config,
                     ParseConfig(yaml, "control_plane_bench", {}));
    const int num_shards = static_cast<int>(ModelShards(config.config).size());
    std::filesystem::create_directories(dir.path() + "/state");
    const std::string config_path = dir.path() + "/config.yaml";
    std::ofstream(config_path) << yaml;
    RETURN_IF_ERROR(WriteNewSecretFile(dir.path() + "/secret"));
    ASSIGN_OR_RETURN(const std::string secret,
                     ReadSecretFile(dir.path() + "/secret"));

    RETURN_IF_ERROR(coordinator.Start(o.binary, config_path,
                                      dir.path() + "/coordinator.log"));
    ASSIGN_OR_RETURN(
        const HostPort address,
        coordinator.WaitAddress(dir.path() + "/state/coordinator.addr",
                                Clock::now() + kCoordinatorStartTimeout));
    std::printf(
        "control plane: the coordinator (pid %d, %s) and %d simulated workers "
        "on %lld io thread(s); heartbeat %lld ms, lease %lld ms, %d shards\n",
        coordinator.pid(), address.ToString().c_str(), n,
        static_cast<long long>(o.io_threads),
        static_cast<long long>(o.heartbeat_ms),
        static_cast<long long>(o.lease_ms), num_shards);
    std::fflush(stdout);

    fleet.emplace(n, static_cast<int>(o.io_threads));
    RETURN_IF_ERROR(RegisterAll(o, address, secret, &coordinator, &*fleet));
    RETURN_IF_ERROR(
        WaitPlacement(n, num_shards, &coordinator, &*fleet).status());
    std::fflush(stdout);
    RETURN_IF_ERROR(
        MeasureHeartbeats(o, &coordinator, &*fleet, &heartbeats_met));
    std::fflush(stdout);
    RETURN_IF_ERROR(
        MeasureFailover(o, num_shards, &coordinator, &*fleet, &failover_met));
    return coordinator.CheckRunning();
  }();
  std::fflush(stdout);
  fleet.reset();  // Members first: then the coordinator, then the directory.
  coordinator.Stop();
  if (!s.ok()) {
    std::fprintf(stderr, "control_plane_bench: %s\n", s.ToString().c_str());
    // A configuration the flags made invalid (e.g. --heartbeat-ms more than
    // half of --lease-ms) is a usage error.
    return s.code() == StatusCode::kInvalidArgument ? 2 : 1;
  }
  return heartbeats_met && failover_met ? 0 : 3;
}

std::string DefaultBinary() {
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return "switchyard";
  return (self.parent_path() / ".." / "bin" / "switchyard").lexically_normal();
}

}  // namespace
}  // namespace switchyard::control

int main(int argc, char** argv) {
  namespace c = switchyard::control;
  switchyard::InitLogging(argv[0]);
  c::BenchOptions o;
  o.binary = c::DefaultBinary();
  bool verbose = false;
  switchyard::FlagParser parser(
      "control_plane_bench [--members N] [--seconds S] [--heartbeat-ms MS] "
      "[--lease-ms MS] [--binary PATH]",
      "Benchmarks the coordinator's control plane: starts `switchyard\n"
      "coordinator` and N simulated workers over TCP in this process, then\n"
      "measures registration, heartbeats per coordinator core-second, and the\n"
      "time from a worker's death to the routing table without it.");
  parser.AddInt("members", &o.members, "simulated workers (2..4096)");
  parser.AddInt("seconds", &o.seconds, "length of the heartbeat window");
  parser.AddInt("heartbeat-ms", &o.heartbeat_ms, "cluster.heartbeat_ms");
  parser.AddInt("lease-ms", &o.lease_ms, "cluster.lease_ms");
  parser.AddInt("call-timeout-ms", &o.call_timeout_ms,
                "cluster.call_timeout_ms");
  parser.AddInt("io-threads", &o.io_threads,
                "threads running the members' io_context (1 or 2)");
  parser.AddInt("register-batch", &o.register_batch,
                "members started at once; the next wave waits for these");
  parser.AddInt("register-timeout-s", &o.register_timeout_s,
                "give up unless every member registered within this time");
  parser.AddString("binary", &o.binary, "the switchyard binary");
  parser.AddBool("verbose", &verbose, "log the members' INFO lines");
  switchyard::Status parsed = parser.Parse(argc, argv, 1);
  if (parser.help_requested()) {
    std::printf("%s", parser.Help().c_str());
    return 0;
  }
  std::string bad;
  if (!parsed.ok()) {
    bad = parsed.message();
  } else if (o.members < 2 || o.members > 4096) {
    bad = "--members must be in [2, 4096]";
  } else if (o.seconds < 1) {
    bad = "--seconds must be >= 1";
  } else if (o.io_threads < 1 || o.io_threads > 2) {
    bad = "--io-threads must be 1 or 2";
  } else if (o.register_batch < 1) {
    bad = "--register-batch must be >= 1";
  } else if (o.register_timeout_s < 1) {
    bad = "--register-timeout-s must be >= 1";
  }
  if (!bad.empty()) {
    std::fprintf(stderr, "control_plane_bench: %s\n%s", bad.c_str(),
                 parser.Help().c_str());
    return 2;
  }
  // The other cluster fields (heartbeat, lease, call timeout) are checked
  // where the configuration is parsed, with the rule they break.
  if (!verbose) FLAGS_minloglevel = google::GLOG_WARNING;
  ::signal(SIGPIPE, SIG_IGN);
  return c::Run(o);
}
