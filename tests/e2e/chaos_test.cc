// The chaos harness (docs/development.md, "Chaos"): `switchyard up` trains
// with checkpoints while a seeded driver, at random instants, kill -9s
// workers, trainers and the coordinator, and pauses workers (SIGSTOP)
// beyond their lease before letting them go on (SIGCONT), and (as root)
// cuts worker-2, which runs in a network namespace of its own behind a veth
// pair, off the network beyond its lease before healing it. Nobody helps:
// `up` restarts what died and the cluster recovers by itself. At the end
// every parameter and optimizer tensor must be bit-identical to the
// single-process reference trained straight through, `up` must exit 0, and
// no committed checkpoint may be lost (the newest committed step never goes
// back, and the last one verifies byte for byte).
//
// It prints faults by kind, recoveries, recovery time (from the fault to
// the first step trainer-0 completes after the cluster recovered: median,
// p90, max), steps redone and committed checkpoints lost.
//
// Sizes (environment): SWITCHYARD_CHAOS_FAULTS faults of each kind
// (default 5: `make test`), SWITCHYARD_CHAOS_SEED (default 1; a failing
// schedule replays with its seed), SWITCHYARD_CHAOS_CONFIG (default
// examples/tiny.yaml), SWITCHYARD_CHAOS_STEPS (default 300; the run must
// outlast the faults), SWITCHYARD_CHAOS_EVERY (checkpoint interval,
// default 10), SWITCHYARD_CHAOS_PARTITIONS (default 1; 0 leaves partitions
// out, and so does a run without root).
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli/status_client.h"
#include "common/net_address.h"
#include "tests/testing/files.h"
#include "tests/testing/processes.h"
#include "tests/testing/run_command.h"
#include "transport/control/auth.h"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

std::string EnvString(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : fallback;
}

using testing::Digests;

// The lines of a growing log file, each stamped when first seen (polled
// every few milliseconds: the stamps are that precise).
class LogWatcher {
 public:
  explicit LogWatcher(std::string path) : path_(std::move(path)) {}

  void Poll() {
    std::ifstream in(path_, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(offset_));
    std::string chunk((std::istreambuf_iterator<char>(in)),
                      std::istreambuf_iterator<char>());
    offset_ += chunk.size();
    partial_ += chunk;
    const auto now = Clock::now();
    size_t start = 0;
    for (size_t nl; (nl = partial_.find('\n', start)) != std::string::npos;
         start = nl + 1) {
      lines_.push_back({now, partial_.substr(start, nl - start)});
    }
    partial_.erase(0, start);
  }

  struct Line {
    Clock::time_point seen;
    std::string text;
  };
  const std::vector<Line>& lines() const { return lines_; }

  // Index of the first line at or after `from` matching `re`, or -1.
  int Find(const std::regex& re, size_t from = 0) const {
    for (size_t i = from; i < lines_.size(); ++i) {
      if (std::regex_search(lines_[i].text, re)) return static_cast<int>(i);
    }
    return -1;
  }

 private:
  const std::string path_;
  size_t offset_ = 0;
  std::string partial_;
  std::vector<Line> lines_;
};

enum class Fault {
  kKillWorker,
  kKillTrainer,
  kKillCoordinator,
  kPauseWorker,
  kPartitionWorker
};

const char* FaultName(Fault f) {
  switch (f) {
    case Fault::kKillWorker:
      return "kill -9 worker";
    case Fault::kKillTrainer:
      return "kill -9 trainer";
    case Fault::kKillCoordinator:
      return "kill -9 coordinator";
    case Fault::kPauseWorker:
      return "SIGSTOP worker beyond its lease";
    case Fault::kPartitionWorker:
      return "worker cut off beyond its lease";
  }
  return "?";
}

struct Outcome {
  Fault fault;
  std::string victim;
  double recovery_ms = 0;
  int64_t steps_redone = 0;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * v.size()));
  return v[i];
}

// Runs `command` through the shell; true when it exits 0.
bool Shell(const std::string& command) {
  return std::system((command + " >/dev/null 2>&1").c_str()) == 0;
}

// A network namespace joined to this one by a veth pair, torn down with
// the object: the members' TCP crosses it (partitions).
class Netns {
 public:
  Netns() {
    const int id = static_cast<int>(::getpid() % 100000);
    name = "syc" + std::to_string(id);
    host_if = "sych" + std::to_string(id);
    ns_if = "sycn" + std::to_string(id);
    const std::string net = "10.214." + std::to_string(id % 250);
    host_ip = net + ".1";
    ns_ip = net + ".2";
    made = Shell("set -e; ip netns add " + name + "; ip link add " + host_if +
                 " type veth peer name " + ns_if + "; ip link set " + ns_if +
                 " netns " + name + "; ip addr add " + host_ip + "/30 dev " +
                 host_if + "; ip link set " + host_if + " up; ip netns exec " +
                 name + " ip addr add " + ns_ip + "/30 dev " + ns_if +
                 "; ip netns exec " + name + " ip link set " + ns_if +
                 " up; ip netns exec " + name + " ip link set lo up");
  }
  ~Netns() {
    Shell("ip link del " + host_if);
    Shell("ip netns del " + name);
  }
  bool Cut() const { return Shell("ip link set " + host_if + " down"); }
  bool Heal() const { return Shell("ip link set " + host_if + " up"); }

  std::string name, host_if, ns_if, host_ip, ns_ip;
  bool made = false;
};

// "[trainer-0] step N/" -> N.
const std::regex kStepLine(R"(^\[trainer-0\] step (\d+)/)");

TEST(ChaosTest, FaultsOfEveryKindAreRecoveredBitForBit) {
  const int per_kind = EnvInt("SWITCHYARD_CHAOS_FAULTS", 5);
  const int seed = EnvInt("SWITCHYARD_CHAOS_SEED", 1);
  const int steps = EnvInt("SWITCHYARD_CHAOS_STEPS", 300);
  const int every = EnvInt("SWITCHYARD_CHAOS_EVERY", 10);
  const std::string config =
      EnvString("SWITCHYARD_CHAOS_CONFIG",
                std::string(SWITCHYARD_SOURCE_DIR) + "/examples/tiny.yaml");
  constexpr int kLeaseMs = 1000;
  constexpr int kWorkers = 3, kTrainers = 2;
  const std::string dir =
      ::testing::TempDir() + "/switchyard_chaos_" + std::to_string(::getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir + "/data");
  testing::WriteTwoLanguageCorpus(dir + "/data");
  std::ostringstream flags;
  flags << " --config " << config << " --data " << dir << "/data"
        << " --set training.steps=" << steps
        << " --set training.log_every=1 --set training.eval_every=0"
        << " --set cluster.workers=" << kWorkers
        << " --set cluster.trainers=" << kTrainers
        << " --set checkpoint.every=" << every << " --set checkpoint.replicas=1"
        << " --set cluster.lease_ms=" << kLeaseMs
        << " --set cluster.heartbeat_ms=100 --set cluster.probation_ms=5000"
        << " --set transport.request_timeout_ms=10000";
  // Partitions need root (ip netns; CI runs as root) and
  // SWITCHYARD_CHAOS_PARTITIONS not 0. Then every member speaks TCP over
  // the veth's addresses, worker-2 from inside the namespace.
  std::optional<Netns> netns;
  if (::geteuid() == 0 && EnvInt("SWITCHYARD_CHAOS_PARTITIONS", 1) != 0) {
    netns.emplace();
    ASSERT_TRUE(netns->made) << "cannot make a network namespace";
    flags << " --set transport.ucx_tls=tcp --set transport.data_host="
          << netns->host_ip
          << " --set transport.ucx.UCX_NET_DEVICES=" << netns->host_if;
  } else {
    std::cout << "chaos: no partitions (they need root)" << std::endl;
  }
  std::cout << "chaos: seed " << seed << ", " << per_kind
            << " faults of each kind, " << steps << " steps of " << config
            << ", checkpoints every " << every << std::endl;

  // The fault-free result.
  const auto reference = testing::RunSwitchyard(
      "train --reference --sample-bytes 0" + flags.str(), 1800);
  ASSERT_EQ(reference.exit_code, 0) << reference.output;
  const auto want = Digests(reference.output);
  ASSERT_FALSE(want.empty()) << reference.output;

  const std::string log_path = dir + "/up.log";
  std::vector<std::string> args = {SWITCHYARD_BINARY, "up",
                                   "--workers",       std::to_string(kWorkers),
                                   "--trainers",      std::to_string(kTrainers),
                                   "--run-dir",       dir + "/run",
                                   "--max-restarts",  "1000"};
  {
    std::istringstream in(flags.str());
    for (std::string f; in >> f;) args.push_back(f);
  }
  if (netns.has_value()) {
    for (const std::string& a : std::vector<std::string>{
             "--coordinator", netns->host_ip + ":0", "--netns",
             "worker-2=" + netns->name, "--member-set",
             "worker-2:transport.data_host=" + netns->ns_ip, "--member-set",
             "worker-2:transport.ucx.UCX_NET_DEVICES=" + netns->ns_if}) {
      args.push_back(a);
    }
  }
  const pid_t up = testing::Spawn(args, log_path);
  LogWatcher log(log_path);
  auto secret = [&]() -> StatusOr<std::string> {
    return control::ReadSecretFile(dir + "/run/secret");
  };
  auto status = [&]() -> StatusOr<control::StatusResponse> {
    std::ifstream in(dir + "/run/coordinator.addr");
    std::string addr;
    if (!(in >> addr)) return UnavailableError("no coordinator.addr");
    ASSIGN_OR_RETURN(std::string s, secret());
    ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(addr));
    return cli::FetchStatus(hp, s, Ms(1000));
  };
  // Committed checkpoints: the newest never goes back.
  int64_t newest_committed = 0;
  int checkpoints_lost = 0;
  auto observe = [&](const control::StatusResponse& s) {
    const int64_t newest =
        s.checkpoints_size() == 0 ? 0 : s.checkpoints().rbegin()->step();
    if (newest < newest_committed) {
      ++checkpoints_lost;
      ADD_FAILURE() << "the newest committed checkpoint went back from "
                    << newest_committed << " to " << newest;
    }
    newest_committed = std::max(newest_committed, newest);
  };
  auto finished = [&] {
    return log.Find(std::regex(R"(\[up\] every trainer has exited)")) >= 0;
  };
  // Every member alive, every shard placed, every worker holding shards
  // (a worker back from a fault rejoins, and the coordinator then moves
  // shards onto it: another epoch), the newest recovery over (every live
  // trainer trains under its epoch), and trainer-0 a step further than
  // when it was called (or the run over): the cluster trains again, and
  // the next fault is a fault of its own, not one within a recovery, whose
  // steps redone would be the earlier fault's.
  auto settle = [&](Clock::time_point deadline) -> StatusOr<int> {
    constexpr size_t kNotYet = ~size_t{0};
    size_t healthy_from = kNotYet;
    while (Clock::now() < deadline) {
      log.Poll();
      if (finished()) return -1;
      auto s = status();
      if (s.ok()) {
        observe(*s);
        int alive = 0;
        bool every_worker_holds = true;
        for (const auto& m : s->members()) {
          alive += m.state() == control::ALIVE;
          every_worker_holds &= m.kind() != control::WORKER || m.shards() > 0;
        }
        const bool recovered = s->recoveries().empty() ||
                               s->recoveries().rbegin()->duration_ms() > 0;
        if (alive == kWorkers + kTrainers &&
            s->placed_shards() == s->total_shards() && every_worker_holds &&
            recovered) {
          if (healthy_from == kNotYet) healthy_from = log.lines().size();
          const int step = log.Find(kStepLine, healthy_from);
          if (step >= 0) return step;
        } else {
          healthy_from = kNotYet;
        }
      }
      std::this_thread::sleep_for(Ms(10));
    }
    return DeadlineExceededError("the cluster did not settle");
  };

  std::vector<Fault> kinds = {Fault::kKillWorker, Fault::kKillTrainer,
                              Fault::kKillCoordinator, Fault::kPauseWorker};
  if (netns.has_value()) kinds.push_back(Fault::kPartitionWorker);
  std::vector<Fault> schedule;
  for (Fault f : kinds) {
    for (int i = 0; i < per_kind; ++i) schedule.push_back(f);
  }
  std::mt19937 rng(seed);
  std::shuffle(schedule.begin(), schedule.end(), rng);
  std::vector<Outcome> outcomes;
  auto settled = settle(Clock::now() + Ms(120000));
  ASSERT_TRUE(settled.ok()) << settled.status().ToString() << "\n"
                            << testing::ReadFile(log_path);
  for (Fault fault : schedule) {
    std::this_thread::sleep_for(Ms(100 + rng() % 500));
    log.Poll();
    auto s = status();
    if (finished() || !s.ok()) break;
    // The last step trainer-0 finished before the fault.
    int64_t before = 0;
    for (const auto& line : log.lines()) {
      std::smatch m;
      if (std::regex_search(line.text, m, kStepLine)) {
        before = std::stoll(m[1]);
      }
    }
    Outcome outcome{fault, "", 0, 0};
    pid_t pid = -1;
    if (fault == Fault::kKillCoordinator) {
      outcome.victim = "coordinator";
      pid = s->coordinator_pid();
    } else if (fault == Fault::kPartitionWorker) {
      outcome.victim = "worker-2";  // The one in the namespace.
      pid = 1;                      // Not signalled.
    } else {
      const bool worker = fault != Fault::kKillTrainer;
      const int n = worker ? kWorkers : kTrainers;
      outcome.victim = std::string(worker ? "worker-" : "trainer-") +
                       std::to_string(rng() % n);
      for (const auto& m : s->members()) {
        if (m.name() == outcome.victim) pid = m.pid();
      }
    }
    ASSERT_GT(pid, 0) << outcome.victim;
    const size_t mark = log.lines().size();
    const auto at = Clock::now();
    if (fault == Fault::kPauseWorker || fault == Fault::kPartitionWorker) {
      const bool pause = fault == Fault::kPauseWorker;
      ASSERT_TRUE(pause ? ::kill(pid, SIGSTOP) == 0 : netns->Cut());
      // The log is read meanwhile: its lines' stamps stay true.
      while (Clock::now() < at + Ms(kLeaseMs * 3 / 2)) {
        log.Poll();
        std::this_thread::sleep_for(Ms(5));
      }
      ASSERT_TRUE(pause ? ::kill(pid, SIGCONT) == 0 : netns->Heal());
    } else {
      ::kill(pid, SIGKILL);
    }
    // Recovered: trainer-0 completes a step after the cluster recovered
    // (after its recovery line, or its restart's first lines; for the
    // coordinator, whose loss training does not notice, the next step).
    const std::regex recovered(
        fault == Fault::kKillCoordinator
            ? R"(^\[trainer-0\] step \d+/)"
            : R"(trainer-0: recovery \d+:|^\[trainer-0\] (resuming at|training \d+ steps))");
    int recovered_line = -1, step_line = -1;
    const auto deadline = at + Ms(120000);
    while (Clock::now() < deadline && step_line < 0) {
      log.Poll();
      recovered_line = log.Find(recovered, mark);
      if (recovered_line >= 0) {
        step_line = fault == Fault::kKillCoordinator
                        ? recovered_line
                        : log.Find(kStepLine, recovered_line);
      }
      if (step_line < 0) std::this_thread::sleep_for(Ms(5));
    }
    ASSERT_GE(step_line, 0) << FaultName(fault) << " " << outcome.victim
                            << " was not recovered from\n"
                            << testing::ReadFile(log_path);
    const auto& line = log.lines()[step_line];
    outcome.recovery_ms =
        std::chrono::duration<double, std::milli>(line.seen - at).count();
    std::smatch m;
    std::regex_search(line.text, m, kStepLine);
    outcome.steps_redone = std::max<int64_t>(0, before - std::stoll(m[1]) + 1);
    outcomes.push_back(outcome);
    std::cout << "chaos: " << std::setw(32) << std::left << FaultName(fault)
              << std::right << " " << outcome.victim << " after step " << before
              << ": trains again in " << std::fixed << std::setprecision(0)
              << outcome.recovery_ms << " ms, " << outcome.steps_redone
              << " steps redone" << std::endl;
    settled = settle(Clock::now() + Ms(120000));
    ASSERT_TRUE(settled.ok()) << settled.status().ToString() << "\n"
                              << testing::ReadFile(log_path);
  }

  const int code = testing::WaitExit(up, std::chrono::seconds(1800));
  if (code == -1) testing::StopAndReap(up);
  log.Poll();
  const std::string text = testing::ReadFile(log_path);
  EXPECT_EQ(code, 0) << text;

  // The figures.
  std::map<Fault, int> by_kind;
  std::vector<double> times;
  int64_t redone = 0, redone_max = 0;
  for (const Outcome& o : outcomes) {
    ++by_kind[o.fault];
    times.push_back(o.recovery_ms);
    redone += o.steps_redone;
    redone_max = std::max(redone_max, o.steps_redone);
  }
  int recoveries = 0;
  for (const auto& l : log.lines()) {
    recoveries += l.text.find("trainer-0: recovery ") != std::string::npos;
  }
  std::cout << "chaos: " << outcomes.size() << " faults:";
  for (const auto& [f, n] : by_kind)
    std::cout << " " << FaultName(f) << " " << n << ";";
  std::cout << "\nchaos: trainer-0 recoveries " << recoveries
            << "; time to train again (ms): median " << std::fixed
            << std::setprecision(0) << Percentile(times, 0.5) << ", p90 "
            << Percentile(times, 0.9) << ", max " << Percentile(times, 1.0)
            << "\nchaos: steps redone " << redone << " in all, at most "
            << redone_max << " for one fault (checkpoint every " << every
            << "); committed checkpoints lost " << checkpoints_lost
            << std::endl;

  // A trainer's death redoes at most the step in flight (trainer-0 may be
  // a step ahead of the workers: two of its lines), the coordinator's
  // none: neither rolls back.
  for (const Outcome& o : outcomes) {
    if (o.fault == Fault::kKillTrainer || o.fault == Fault::kKillCoordinator) {
      EXPECT_LE(o.steps_redone, o.fault == Fault::kKillTrainer ? 2 : 0)
          << FaultName(o.fault) << " " << o.victim;
    }
  }
  for (Fault f : kinds) {
    EXPECT_EQ(by_kind[f], per_kind)
        << FaultName(f)
        << ": the run ended before every fault was made; "
           "raise SWITCHYARD_CHAOS_STEPS";
  }
  EXPECT_EQ(Digests(text), want) << text;
  EXPECT_EQ(checkpoints_lost, 0);
  const auto verify =
      testing::RunSwitchyard("ckpt verify --run-dir " + dir + "/run");
  EXPECT_EQ(verify.exit_code, 0) << verify.output;
  if (!HasFailure()) std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace switchyard
