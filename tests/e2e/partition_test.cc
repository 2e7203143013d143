// Network partitions (docs/operations.md, "Failures"): a real cluster of
// separate processes in which worker-2 lives in a network namespace of its
// own, joined to the others by a veth pair (`ip netns`, `ip link`; needs
// root, as CI has). Every member speaks TCP only (transport.ucx_tls=tcp),
// so that the data plane crosses the veth like the control plane.
//
// - The link is cut for three leases, then healed: worker-2 is fenced, its
//   shards re-placed, and the run goes on without it; healed, it finds it
//   was fenced, rejoins as a new incarnation and serves shards again. The
//   run ends bit-identical to the reference trained straight through.
// - The same for trainer-1: fenced (the cluster holds, nothing rolls
//   back), healed it rejoins with its rank.
// - The link delays and drops packets (tc netem where the kernel has it,
//   else a token-bucket shaper whose queue limit drops), below the lease:
//   the run is slower but no member is declared dead, nothing is redone,
//   and the result is bit-identical.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/testing/files.h"
#include "tests/testing/processes.h"
#include "tests/testing/run_command.h"
#include "transport/control/auth.h"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;
using testing::Digests;
using testing::RunSwitchyard;

// Runs `command` through the shell; its exit code, output into *output.
int Shell(const std::string& command, std::string* output = nullptr) {
  const std::string full = command + " 2>&1";
  FILE* p = ::popen(full.c_str(), "r");
  if (p == nullptr) return -1;
  std::string text;
  char buf[512];
  while (size_t n = std::fread(buf, 1, sizeof(buf), p)) text.append(buf, n);
  const int status = ::pclose(p);
  if (output != nullptr) *output = text;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

class PartitionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) {
      GTEST_SKIP() << "network namespaces need root (CI runs as root)";
    }
    const int id = static_cast<int>(::getpid() % 100000);
    ns_ = "sy" + std::to_string(id);
    host_if_ = "syh" + std::to_string(id);
    ns_if_ = "syn" + std::to_string(id);
    const std::string net = "10.213." + std::to_string(id % 250);
    host_ip_ = net + ".1";
    ns_ip_ = net + ".2";
    std::string out;
    const std::string setup =
        "set -e; ip netns add " + ns_ + "; ip link add " + host_if_ +
        " type veth peer name " + ns_if_ + "; ip link set " + ns_if_ +
        " netns " + ns_ + "; ip addr add " + host_ip_ + "/30 dev " + host_if_ +
        "; ip link set " + host_if_ + " up; ip netns exec " + ns_ +
        " ip addr add " + ns_ip_ + "/30 dev " + ns_if_ + "; ip netns exec " +
        ns_ + " ip link set " + ns_if_ + " up; ip netns exec " + ns_ +
        " ip link set lo up";
    ASSERT_EQ(Shell(setup, &out), 0) << setup << "\n" << out;
    made_ = true;
    dir_ = ::testing::TempDir() + "/switchyard_partition_" +
           std::to_string(::getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_ + "/data");
    testing::WriteTwoLanguageCorpus(dir_ + "/data");
    ASSERT_TRUE(control::WriteNewSecretFile(dir_ + "/secret").ok());
  }

  void TearDown() override {
    for (auto it = pids_.rbegin(); it != pids_.rend(); ++it) {
      testing::StopAndReap(*it);
    }
    if (made_) {
      Shell("ip link del " + host_if_);
      Shell("ip netns del " + ns_);
    }
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  // The flags of every run: the tiny model, 3 workers, 2 trainers, TCP only,
  // heartbeats every 100 ms and a lease of `lease_ms`.
  std::string Flags(int steps) const {
    return " --config " + std::string(SWITCHYARD_SOURCE_DIR) +
           "/examples/tiny.yaml --data " + dir_ +
           "/data --set training.steps=" + std::to_string(steps) +
           " --set training.log_every=5 --set training.eval_every=0"
           " --set cluster.trainers=2 --set cluster.workers=3"
           " --set training.threads=1 --set checkpoint.every=10"
           " --set cluster.heartbeat_ms=100 --set cluster.lease_ms=" +
           std::to_string(lease_ms_) + " --set transport.ucx_tls=tcp";
  }

  std::vector<std::string> Args(const std::string& flags) const {
    std::vector<std::string> args;
    std::istringstream in(flags);
    for (std::string f; in >> f;) args.push_back(f);
    return args;
  }

  // Starts the coordinator on the host's end of the veth, the workers and
  // the trainers (cut_off_ in the namespace), each logging to
  // <dir>/<name>.log.
  void StartCluster(int steps) {
    const std::string flags = Flags(steps) + " --state-dir " + dir_ +
                              "/run --secret-file " + dir_ + "/secret";
    auto start = [&](const std::string& name, std::vector<std::string> head,
                     const std::string& more) {
      for (const std::string& a : Args(flags + more)) head.push_back(a);
      pids_.push_back(testing::Spawn(head, Log(name)));
    };
    start("coordinator", {SWITCHYARD_BINARY, "coordinator"},
          " --coordinator " + host_ip_ + ":0");
    const std::string addr_file = dir_ + "/run/coordinator.addr";
    std::string address;
    const auto deadline = Clock::now() + std::chrono::seconds(15);
    while (address.empty() && Clock::now() < deadline) {
      std::ifstream in(addr_file);
      if (!(in >> address)) std::this_thread::sleep_for(Ms(20));
    }
    ASSERT_FALSE(address.empty()) << Read("coordinator");
    const std::string joined = " --coordinator " + address;
    // `member` in the namespace, the others beside the coordinator.
    auto place = [&](const std::string& name, std::vector<std::string> cmd) {
      const bool inside = name == cut_off_;
      if (inside) {
        cmd.insert(cmd.begin(), {"/usr/sbin/ip", "netns", "exec", ns_});
      }
      // UCX's TCP uses every interface it sees unless told: here only
      // the veth's end (a source address from another one would not be
      // routed back to the namespace).
      start(name, cmd,
            joined +
                " --set transport.data_host=" + (inside ? ns_ip_ : host_ip_) +
                " --set transport.ucx.UCX_NET_DEVICES=" +
                (inside ? ns_if_ : host_if_));
    };
    for (int i = 0; i < 3; ++i) {
      const std::string name = "worker-" + std::to_string(i);
      place(name, {SWITCHYARD_BINARY, "worker", "--name", name});
    }
    for (int r = 0; r < 2; ++r) {
      place("trainer-" + std::to_string(r),
            {SWITCHYARD_BINARY, "train", "--rank", std::to_string(r),
             "--sample-bytes", "0"});
    }
    trainers_ = {pids_.end()[-2], pids_.end()[-1]};
  }

  std::string Log(const std::string& name) const {
    return dir_ + "/" + name + ".log";
  }
  std::string Read(const std::string& name) const {
    return testing::ReadFile(Log(name));
  }
  std::string ReadAll() const {
    std::string all;
    for (const char* n : {"coordinator", "worker-0", "worker-1", "worker-2",
                          "trainer-0", "trainer-1"}) {
      all += "----- " + std::string(n) + "\n" + Read(n);
    }
    return all;
  }

  // Waits until trainer-0 has logged step `step`.
  bool WaitForStep(int step) {
    const auto deadline = Clock::now() + std::chrono::seconds(90);
    const std::string want = "step " + std::to_string(step) + "/";
    while (Clock::now() < deadline) {
      if (Read("trainer-0").find(want) != std::string::npos) return true;
      std::this_thread::sleep_for(Ms(20));
    }
    return false;
  }

  // Waits for both trainers to exit; true when both exited 0.
  bool WaitForTrainers() {
    bool ok = true;
    for (pid_t t : trainers_) {
      const int code = testing::WaitExit(t, std::chrono::seconds(180));
      ok &= code == 0;
      // Reaped: TearDown must not signal its pid (another process's by
      // then) nor wait 10 s for it.
      if (code != -1) std::replace(pids_.begin(), pids_.end(), t, pid_t{-1});
    }
    return ok;
  }

  // The digests the workers logged at the run's end.
  std::map<std::string, std::string> WorkerDigests() const {
    std::string all;
    for (const char* n : {"worker-0", "worker-1", "worker-2"}) all += Read(n);
    return Digests(all);
  }

  std::map<std::string, std::string> Reference(int steps) {
    const auto r =
        RunSwitchyard("train --reference --sample-bytes 0" + Flags(steps));
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return Digests(r.output);
  }

  // Trains `steps` with cut_off_ in the namespace, cuts its link for
  // three leases past step 25, heals it, and waits for the trainers to
  // end cleanly; *want: the reference's digests.
  void TrainCutOffAtStep25(int steps,
                           std::map<std::string, std::string>* want) {
    *want = Reference(steps);
    ASSERT_EQ(want->size(), 18u);
    StartCluster(steps);
    ASSERT_TRUE(WaitForStep(25)) << ReadAll();
    ASSERT_EQ(Shell("ip link set " + host_if_ + " down"), 0);
    std::this_thread::sleep_for(Ms(3000));
    ASSERT_EQ(Shell("ip link set " + host_if_ + " up"), 0);
    ASSERT_TRUE(WaitForTrainers()) << ReadAll();
  }

  std::string ns_, host_if_, ns_if_, host_ip_, ns_ip_, dir_;
  bool made_ = false;
  int lease_ms_ = 1000;
  std::string cut_off_ = "worker-2";  // The member in the namespace.
  std::vector<pid_t> pids_;
  std::vector<pid_t> trainers_;
};

TEST_F(PartitionTest, AWorkerCutOffBeyondItsLeaseIsFencedAndRejoins) {
  std::map<std::string, std::string> want;
  ASSERT_NO_FATAL_FAILURE(TrainCutOffAtStep25(120, &want));
  const std::string coordinator = Read("coordinator");
  const std::string worker2 = Read("worker-2");
  // Fenced at its lease, while cut off.
  static const std::regex kFenced(
      R"(worker worker-2 \(incarnation (\d+)\) lease expired)");
  std::smatch fenced;
  ASSERT_TRUE(std::regex_search(coordinator, fenced, kFenced)) << ReadAll();
  // Healed, it learns it was fenced and rejoins as a new incarnation...
  const size_t told = worker2.find("of worker-2 is not current");
  ASSERT_NE(told, std::string::npos) << ReadAll();
  static const std::regex kRejoined(
      R"(worker worker-2 registered \(incarnation (\d+))");
  bool rejoined = false;
  for (std::sregex_iterator
           it(coordinator.begin(), coordinator.end(), kRejoined),
       end;
       it != end; ++it) {
    rejoined |= std::stoull((*it)[1]) > std::stoull(fenced[1]);
  }
  EXPECT_TRUE(rejoined) << coordinator;
  // ...and serves shards again once placed.
  static const std::regex kHolds(R"(worker-2: routing epoch \d+: holds [1-9])");
  const std::string after = worker2.substr(told);
  EXPECT_TRUE(std::regex_search(after, kHolds)) << worker2;
  EXPECT_NE(Read("trainer-0").find("recovery 1:"), std::string::npos)
      << Read("trainer-0");
  // The data plane crossed the veth too.
  EXPECT_NE(Read("trainer-0").find("connected to " + ns_ip_ + ":"),
            std::string::npos)
      << Read("trainer-0");
  // Nothing it did while cut off counted: the result is the reference's.
  EXPECT_EQ(WorkerDigests(), want) << ReadAll();
}

// A trainer cut off beyond its lease: fenced (a hold; nothing rolls
// back), healed it rejoins as a new incarnation with its rank, and the run
// ends bit-identical.
TEST_F(PartitionTest, ATrainerCutOffBeyondItsLeaseIsFencedAndRejoins) {
  cut_off_ = "trainer-1";
  std::map<std::string, std::string> want;
  ASSERT_NO_FATAL_FAILURE(TrainCutOffAtStep25(100, &want));
  const std::string coordinator = Read("coordinator");
  EXPECT_NE(coordinator.find("trainer trainer-1 (incarnation"),
            std::string::npos)
      << coordinator;
  static const std::regex kHold(
      R"(trainer trainer-1 \(incarnation \d+\) lease expired.*holding the cluster)");
  EXPECT_TRUE(std::regex_search(coordinator, kHold)) << coordinator;
  EXPECT_NE(Read("trainer-1").find("of trainer-1 is not current"),
            std::string::npos)
      << Read("trainer-1");
  const std::string all = ReadAll();
  EXPECT_EQ(all.find("rolling back from step"), std::string::npos) << all;
  EXPECT_EQ(WorkerDigests(), want) << all;
}

TEST_F(PartitionTest, DelayAndLossBelowTheLeaseDeclareNothing) {
  // The default lease: TCP's retransmission backs off from 200 ms, so a
  // lost heartbeat and its retry can take most of a second.
  lease_ms_ = 3000;
  const int steps = 60;
  const auto want = Reference(steps);
  ASSERT_EQ(want.size(), 18u);
  // Both directions of the link: netem's delay and loss where the kernel
  // has it, else a shaper whose 10 ms queue drops what bursts beyond it.
  const std::string host_tc = "tc qdisc add dev " + host_if_ + " root ";
  const std::string ns_tc =
      "ip netns exec " + ns_ + " tc qdisc add dev " + ns_if_ + " root ";
  std::string how = "netem delay 20ms 10ms loss 2%";
  if (Shell(host_tc + how) != 0) {
    how = "tbf rate 40mbit burst 16kb latency 10ms";
    std::string out;
    ASSERT_EQ(Shell(host_tc + how, &out), 0) << out;
  }
  std::string out;
  ASSERT_EQ(Shell(ns_tc + how, &out), 0) << out;
  StartCluster(steps);
  ASSERT_TRUE(WaitForTrainers()) << ReadAll();
  // Packets were delayed and dropped...
  std::string stats;
  ASSERT_EQ(Shell("tc -s qdisc show dev " + host_if_, &stats), 0);
  static const std::regex kDropped(R"(dropped (\d+))");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(stats, m, kDropped)) << stats;
  EXPECT_GT(std::stoll(m[1]), 0) << how << "\n" << stats;
  std::cout << "partition: " << how << ": " << stats << std::endl;
  // ...yet no member was declared dead and nothing was redone.
  const std::string all = ReadAll();
  EXPECT_EQ(all.find("lease expired"), std::string::npos) << all;
  EXPECT_EQ(all.find("recovery 1:"), std::string::npos) << all;
  EXPECT_EQ(all.find("holding the cluster"), std::string::npos) << all;
  EXPECT_EQ(WorkerDigests(), want) << all;
}

}  // namespace
}  // namespace switchyard
