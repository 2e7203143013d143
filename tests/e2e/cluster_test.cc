// A real local cluster: `switchyard up` with a coordinator and 3 workers as
// separate processes on loopback. A worker is SIGKILLed and must be fenced,
// with its shards placed elsewhere at a higher epoch, within two lease
// periods, and come back (restarted by `up`); then the coordinator is
// SIGKILLed, restarted by `up`, and must come back with the same placement.
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <thread>

#include "cli/status_client.h"
#include "tests/testing/files.h"
#include "tests/testing/processes.h"
#include "transport/control/auth.h"
#include "transport/data_plane.h"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

constexpr int kLeaseMs = 1000;

using testing::Spawn;
using testing::StopAndReap;

std::map<std::string, std::string> Placement(const control::StatusResponse& s) {
  std::map<std::string, std::string> homes;
  const auto& t = s.routing();
  for (const auto& e : t.entries()) {
    const auto& r = e.shard();
    const std::string id = r.kind() == control::DENSE
                               ? "D" + std::to_string(r.shard())
                               : "L" + std::to_string(r.layer()) + ".E" +
                                     std::to_string(r.expert()) + ".S" +
                                     std::to_string(r.shard());
    homes[id] = e.worker() < 0 ? "" : t.workers(e.worker()).name();
  }
  return homes;
}

const control::MemberStatus* Find(const control::StatusResponse& s,
                                  const std::string& name) {
  for (const auto& m : s.members()) {
    if (m.name() == name) return &m;
  }
  return nullptr;
}

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ =
        ::testing::TempDir() + "/switchyard_e2e_" + std::to_string(::getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    log_ = dir_ + "/cluster.log";
  }
  void TearDown() override {
    StopAndReap(up_pid_);
    if (HasFailure()) {
      std::ifstream in(log_);
      std::cerr << "---- cluster log ----\n" << in.rdbuf() << "\n";
    }
    std::filesystem::remove_all(dir_);
  }

  // Polls status until `pred` holds or `timeout` passes.
  template <typename Pred>
  StatusOr<control::StatusResponse> WaitFor(Pred pred, Ms timeout) {
    const auto deadline = Clock::now() + timeout;
    Status last = DeadlineExceededError("condition never held");
    while (Clock::now() < deadline) {
      auto s = Fetch();
      if (s.ok() && pred(*s)) return s;
      if (!s.ok()) last = s.status();
      std::this_thread::sleep_for(Ms(50));
    }
    return last;
  }

  StatusOr<control::StatusResponse> Fetch() {
    std::ifstream in(dir_ + "/coordinator.addr");
    std::string addr;
    if (!(in >> addr)) return UnavailableError("no coordinator.addr yet");
    auto secret = control::ReadSecretFile(dir_ + "/secret");
    if (!secret.ok()) return secret.status();
    return cli::FetchStatus(*ParseHostPort(addr), *secret, Ms(1000));
  }

  // Output of `switchyard status --run-dir <dir> <flags>`.
  std::string RunStatus(const std::string& flags) {
    const std::string command = std::string(SWITCHYARD_BINARY) +
                                " status --run-dir " + dir_ + " " + flags;
    FILE* pipe = ::popen(command.c_str(), "r");
    std::string output;
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) {
      output.append(buf, n);
    }
    EXPECT_EQ(::pclose(pipe), 0) << command;
    return output;
  }

  std::string dir_, log_;
  pid_t up_pid_ = -1;
};

std::vector<std::string> ClusterOverrides() {
  return {"--set", "cluster.lease_ms=" + std::to_string(kLeaseMs),
          "--set", "cluster.heartbeat_ms=200",
          "--set", "model.num_experts=16"};
}

TEST_F(ClusterTest, WorkerDeathAndCoordinatorRestart) {
  // No trainers: a trainer trains and exits, and without checkpoints (a
  // later issue) it cannot outlive a worker's death; `up` stops the cluster
  // when its trainers are done.
  std::vector<std::string> up = {SWITCHYARD_BINARY, "up", "--workers", "3",
                                 "--trainers",      "0",  "--run-dir", dir_};
  for (const auto& o : ClusterOverrides()) up.push_back(o);
  up_pid_ = Spawn(up, log_);

  // 1. All three workers alive, every shard placed, each worker holding some.
  auto ready = WaitFor(
      [](const control::StatusResponse& s) {
        int alive = 0;
        for (const auto& m : s.members()) {
          alive += m.kind() == control::WORKER && m.state() == control::ALIVE &&
                   m.shards() > 0;
        }
        return alive == 3 && s.placed_shards() == s.total_shards();
      },
      Ms(60000));
  ASSERT_TRUE(ready.ok()) << ready.status().ToString();
  const uint64_t epoch_before_kill = ready->epoch();

  // The status command shows all three, as a table and as JSON.
  const std::string table = RunStatus("");
  for (const char* name : {"worker-0", "worker-1", "worker-2"}) {
    EXPECT_NE(table.find(name), std::string::npos) << table;
  }
  EXPECT_NE(
      table.find("placement: " + std::to_string(ready->total_shards()) + "/" +
                 std::to_string(ready->total_shards()) + " shards placed"),
      std::string::npos)
      << table;
  control::StatusResponse from_json;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(
                  RunStatus("--json --routing"), &from_json)
                  .ok());
  EXPECT_EQ(from_json.routing().entries_size(), ready->total_shards());
  EXPECT_EQ(from_json.members_size(), 3);

  // A worker process serves its expert shards over UCX at the current epoch,
  // and refuses a request from an older one.
  {
    const auto& routing = from_json.routing();
    const control::RoutingEntry* entry = nullptr;
    for (const auto& e : routing.entries()) {
      if (e.shard().kind() == control::EXPERT && e.worker() >= 0) {
        entry = &e;
        break;
      }
    }
    ASSERT_NE(entry, nullptr);
    const std::string address = routing.workers(entry->worker()).data_address();
    transport::DataPlaneOptions options;
    options.secret = *control::ReadSecretFile(dir_ + "/secret");
    auto client = transport::NewUcxDataPlane(options).value();
    ASSERT_TRUE(client->Start(nullptr).ok());
    auto forward = [&](uint64_t epoch) {
      transport::Message m;
      m.header.kind =
          static_cast<uint8_t>(transport::MessageKind::kExpertForward);
      m.header.epoch = epoch;
      m.header.layer = entry->shard().layer();
      m.header.expert = entry->shard().expert();
      m.header.shard = entry->shard().shard();
      m.payload = Tensor::Zeros(DType::kF32, {3, 64}).value();  // d_model 64.
      m.header.dtype = static_cast<uint8_t>(DType::kF32);
      m.header.rows = 3;
      m.header.cols = 64;
      m.header.payload_bytes = m.payload.num_bytes();
      return client->SendSync(address, std::move(m), Ms(10000));
    };
    // Workers adopt a table on their own routing thread, after the
    // coordinator publishes it: until then they refuse its epoch as not
    // ready (ABORTED), and a sender retries, as trainers do.
    auto ok = forward(routing.epoch());
    const auto adopt_deadline = Clock::now() + Ms(10000);
    while (ok.status().code() == StatusCode::kAborted &&
           Clock::now() < adopt_deadline) {
      std::this_thread::sleep_for(Ms(20));
      ok = forward(routing.epoch());
    }
    ASSERT_TRUE(ok.ok()) << ok.status().ToString();
    EXPECT_EQ(ok->payload.shape(), (std::vector<int64_t>{3, 64}));
    auto stale = forward(routing.epoch() - 1);
    EXPECT_EQ(stale.status().code(), StatusCode::kFailedPrecondition);
    client->Shutdown();
  }
  const control::MemberStatus* victim = Find(*ready, "worker-1");
  ASSERT_NE(victim, nullptr);
  ASSERT_GT(victim->pid(), 0);

  // 2. SIGKILL worker-1: fenced (a higher epoch, its shards elsewhere) in
  // under 2 leases; `up` restarts it under its name, as a new incarnation.
  const uint64_t victim_incarnation = victim->incarnation();
  const pid_t victim_pid = victim->pid();
  ASSERT_EQ(::kill(victim_pid, SIGKILL), 0);
  const auto killed_at = Clock::now();
  auto fenced = WaitFor(
      [&](const control::StatusResponse& s) {
        const auto* w = Find(s, "worker-1");
        return s.epoch() > epoch_before_kill &&
               (w->state() == control::DEAD ||
                w->incarnation() != victim_incarnation);
      },
      Ms(10 * kLeaseMs));
  const auto detection = Clock::now() - killed_at;
  ASSERT_TRUE(fenced.ok()) << fenced.status().ToString();
  std::cout << "worker-1 fenced "
            << std::chrono::duration_cast<Ms>(detection).count()
            << " ms after SIGKILL (lease " << kLeaseMs << " ms)\n";
  EXPECT_LT(detection, Ms(2 * kLeaseMs))
      << "death noticed after "
      << std::chrono::duration_cast<Ms>(detection).count() << " ms";
  // Back, and settled: its shards came back to it (a live move at a step
  // boundary, or a rollback that places them), no move or hold pending.
  auto restarted = WaitFor(
      [&](const control::StatusResponse& s) {
        const auto* w = Find(s, "worker-1");
        return w->state() == control::ALIVE && w->pid() != victim_pid &&
               w->shards() > 0 && s.placed_shards() == s.total_shards() &&
               !s.routing().hold() && s.pending_move().empty();
      },
      Ms(30000));
  ASSERT_TRUE(restarted.ok()) << restarted.status().ToString();
  EXPECT_GT(Find(*restarted, "worker-1")->incarnation(), victim_incarnation);
  const auto placement = Placement(*restarted);

  // 3. SIGKILL the coordinator: `up` restarts it on the same state and
  // address, and the workers are confirmed, not fenced.
  const pid_t old_coordinator = restarted->coordinator_pid();
  ASSERT_GT(old_coordinator, 0);
  ASSERT_EQ(::kill(old_coordinator, SIGKILL), 0);
  auto resumed = WaitFor(
      [old_coordinator](const control::StatusResponse& s) {
        int alive = 0;
        for (const auto& m : s.members()) alive += m.state() == control::ALIVE;
        return s.coordinator_pid() != old_coordinator && alive == 3;
      },
      Ms(30000));
  ASSERT_TRUE(resumed.ok()) << resumed.status().ToString();
  EXPECT_EQ(Placement(*resumed), placement);
  for (const char* name : {"worker-0", "worker-1", "worker-2"}) {
    EXPECT_EQ(Find(*resumed, name)->incarnation(),
              Find(*restarted, name)->incarnation())
        << name;
  }
}

// A member that does not exit cleanly makes `up` fail and says which, even
// when it was not the cause of the stop (before: `up --duration-s` exited 0
// with a worker dead of SIGKILL, and exits at shutdown went unreported).
// With restarts spent (--max-restarts 0), a crashed member stops `up`.
TEST_F(ClusterTest, UpFailsWhenAMemberDidNotExitCleanly) {
  std::vector<std::string> up = {
      SWITCHYARD_BINARY, "up", "--workers", "2",  "--trainers",     "0",
      "--duration-s",    "4",  "--run-dir", dir_, "--max-restarts", "0"};
  for (const auto& o : ClusterOverrides()) up.push_back(o);
  up_pid_ = Spawn(up, log_);
  auto ready = WaitFor(
      [](const control::StatusResponse& s) {
        const auto* w1 = Find(s, "worker-1");
        return w1 != nullptr && w1->state() == control::ALIVE && w1->pid() > 0;
      },
      Ms(60000));
  ASSERT_TRUE(ready.ok()) << ready.status().ToString();
  ASSERT_EQ(::kill(Find(*ready, "worker-1")->pid(), SIGKILL), 0);
  const int code = testing::WaitExit(up_pid_, Ms(60000));
  if (code != -1) up_pid_ = -1;  // Reaped; else TearDown stops it.
  EXPECT_EQ(code, 1);
  std::ifstream in(log_);
  const std::string log((std::istreambuf_iterator<char>(in)),
                        std::istreambuf_iterator<char>());
  EXPECT_NE(log.find("[up] not a clean exit: worker-1"), std::string::npos)
      << log;
  EXPECT_NE(log.find("--max-restarts"), std::string::npos) << log;
}

bool ProcessExists(pid_t pid) { return ::kill(pid, 0) == 0; }

// `up` supervises: a member killed by a signal comes back under its name
// (a new process, a new incarnation), and `up` killed by SIGKILL takes
// every child with it, so that the run directory is usable at once by the
// next `up` (before: its workers ran on for 90 s and more, and a second
// `up` failed after 60 s on their stores' locks).
TEST_F(ClusterTest, UpRestartsCrashedMembersAndLeavesNothingBehind) {
  std::vector<std::string> up = {SWITCHYARD_BINARY, "up", "--workers", "2",
                                 "--trainers",      "0",  "--run-dir", dir_};
  for (const auto& o : ClusterOverrides()) up.push_back(o);
  up.push_back("--set");
  up.push_back("checkpoint.every=5");  // Workers open their stores.
  up_pid_ = Spawn(up, log_);
  auto ready = WaitFor(
      [](const control::StatusResponse& s) {
        const auto* w1 = Find(s, "worker-1");
        return s.placed() && w1 != nullptr && w1->state() == control::ALIVE &&
               w1->pid() > 0;
      },
      Ms(60000));
  ASSERT_TRUE(ready.ok()) << ready.status().ToString();
  const pid_t first = Find(*ready, "worker-1")->pid();
  const uint64_t incarnation = Find(*ready, "worker-1")->incarnation();
  ASSERT_EQ(::kill(first, SIGKILL), 0);
  auto back = WaitFor(
      [&](const control::StatusResponse& s) {
        const auto* w1 = Find(s, "worker-1");
        return w1 != nullptr && w1->state() == control::ALIVE &&
               w1->pid() > 0 && w1->pid() != first;
      },
      Ms(30000));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_GT(Find(*back, "worker-1")->incarnation(), incarnation);
  std::vector<pid_t> children = {back->coordinator_pid()};
  for (const auto& m : back->members()) children.push_back(m.pid());

  // SIGKILL `up`: its children die with it.
  ASSERT_EQ(::kill(up_pid_, SIGKILL), 0);
  ::waitpid(up_pid_, nullptr, 0);
  up_pid_ = -1;
  const auto deadline = Clock::now() + Ms(5000);
  for (pid_t child : children) {
    while (ProcessExists(child) && Clock::now() < deadline) {
      std::this_thread::sleep_for(Ms(20));
    }
    EXPECT_FALSE(ProcessExists(child)) << "pid " << child << " outlived up";
  }
  // The run directory (coordinator state, worker stores) is free again.
  std::filesystem::remove(dir_ + "/coordinator.addr");
  up_pid_ = Spawn(up, log_ + ".2");
  auto again = WaitFor(
      [](const control::StatusResponse& s) {
        int alive = 0;
        for (const auto& m : s.members()) alive += m.state() == control::ALIVE;
        return s.placed() && alive == 2;
      },
      Ms(30000));
  EXPECT_TRUE(again.ok()) << again.status().ToString() << "\n"
                          << testing::ReadFile(log_ + ".2");
}

}  // namespace
}  // namespace switchyard
