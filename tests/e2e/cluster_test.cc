// A real local cluster: `switchyard up` with a coordinator and 3 workers as
// separate processes on loopback. A worker is SIGKILLed and must be declared
// dead, with its shards placed elsewhere at a higher epoch, within two lease
// periods; then the coordinator is SIGKILLed and restarted, and must come
// back with the same placement.
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
    StopAndReap(coordinator_pid_);
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
  pid_t up_pid_ = -1, coordinator_pid_ = -1;
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

  // 2. SIGKILL worker-1: dead, shards elsewhere, higher epoch, in 2 leases.
  ASSERT_EQ(::kill(victim->pid(), SIGKILL), 0);
  const auto killed_at = Clock::now();
  auto failed_over = WaitFor(
      [](const control::StatusResponse& s) {
        const auto* w = Find(s, "worker-1");
        return w != nullptr && w->state() == control::DEAD;
      },
      Ms(10 * kLeaseMs));
  const auto detection = Clock::now() - killed_at;
  ASSERT_TRUE(failed_over.ok()) << failed_over.status().ToString();
  std::cout << "worker-1 declared dead "
            << std::chrono::duration_cast<Ms>(detection).count()
            << " ms after SIGKILL (lease " << kLeaseMs << " ms)\n";
  EXPECT_LT(detection, Ms(2 * kLeaseMs))
      << "death noticed after "
      << std::chrono::duration_cast<Ms>(detection).count() << " ms";
  EXPECT_GT(failed_over->epoch(), epoch_before_kill);
  EXPECT_EQ(failed_over->placed_shards(), failed_over->total_shards());
  const auto placement = Placement(*failed_over);
  for (const auto& [shard, home] : placement) {
    EXPECT_TRUE(home == "worker-0" || home == "worker-2")
        << shard << " " << home;
  }

  // 3. SIGKILL the coordinator and start a new one on the same state and port.
  const pid_t old_coordinator = failed_over->coordinator_pid();
  ASSERT_GT(old_coordinator, 0);
  std::string addr;
  std::ifstream(dir_ + "/coordinator.addr") >> addr;
  ASSERT_EQ(::kill(old_coordinator, SIGKILL), 0);
  std::filesystem::remove(dir_ + "/coordinator.addr");
  std::vector<std::string> coordinator = {
      SWITCHYARD_BINARY, "coordinator",      "--state-dir",   dir_,
      "--secret-file",   dir_ + "/secret",   "--coordinator", addr,
      "--set",           "cluster.workers=3"};
  for (const auto& o : ClusterOverrides()) coordinator.push_back(o);
  coordinator_pid_ = Spawn(coordinator, log_);
  auto resumed = WaitFor(
      [old_coordinator](const control::StatusResponse& s) {
        const auto* w0 = Find(s, "worker-0");
        const auto* w2 = Find(s, "worker-2");
        return s.coordinator_pid() != old_coordinator && w0 && w2 &&
               w0->state() == control::ALIVE && w2->state() == control::ALIVE;
      },
      Ms(30000));
  ASSERT_TRUE(resumed.ok()) << resumed.status().ToString();
  EXPECT_GT(resumed->epoch(), failed_over->epoch());
  EXPECT_EQ(Placement(*resumed), placement);
  // The surviving workers were confirmed, not fenced: same incarnations.
  EXPECT_EQ(Find(*resumed, "worker-0")->incarnation(),
            Find(*failed_over, "worker-0")->incarnation());
  EXPECT_EQ(Find(*resumed, "worker-1")->state(), control::DEAD);
}

// A member that does not exit cleanly makes `up` fail and says which, even
// when it was not the cause of the stop (before: `up --duration-s` exited 0
// with a worker dead of SIGKILL, and exits at shutdown went unreported).
TEST_F(ClusterTest, UpFailsWhenAMemberDidNotExitCleanly) {
  std::vector<std::string> up = {SWITCHYARD_BINARY, "up", "--workers",    "2",
                                 "--trainers",      "0",  "--duration-s", "4",
                                 "--run-dir",       dir_};
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
}

}  // namespace
}  // namespace switchyard
