// The UCX data plane across processes: echoes to a server in a child
// process, that server SIGKILLed mid-request, concurrent large echoes and
// the lanes they take, and transport.ucx settings reaching UCX.
//
// This file holds data_plane_test's main: the binary doubles as the remote
// server (`data_plane_test --serve FILE` runs an echo server and writes its
// address to FILE) and as the lane reporter (`--lanes NAME=VALUE FILE`, see
// ReportLanes).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/config.h"
#include "common/logging.h"
#include "tests/testing/data_plane_options.h"
#include "tests/transport/data_plane_test_util.h"
#include "transport/data_plane.h"

namespace switchyard::transport::data_plane_testing {
namespace {

// This binary (argv[0]): the child processes run it with --serve or --lanes.
std::string g_self_binary;

class RemoteServer {
 public:
  RemoteServer() {
    file_ = ::testing::TempDir() + "/dp_server_" + std::to_string(::getpid());
    std::remove(file_.c_str());
    pid_ = ::fork();
    if (pid_ == 0) {
      ::execl(g_self_binary.c_str(), g_self_binary.c_str(), "--serve",
              file_.c_str(), nullptr);
      ::_exit(127);
    }
    const auto deadline = Clock::now() + Ms(20000);
    while (Clock::now() < deadline) {
      std::ifstream in(file_);
      if (in >> address_) break;
      std::this_thread::sleep_for(Ms(20));
    }
  }
  ~RemoteServer() {
    Kill();
    std::remove(file_.c_str());
  }
  void Kill() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }
  const std::string& address() const { return address_; }

 private:
  pid_t pid_ = -1;
  std::string file_, address_;
};

TEST(DataPlaneAcrossProcessesTest, EchoAndPeerKilledMidRequest) {
  RemoteServer server;
  ASSERT_FALSE(server.address().empty()) << "remote server did not start";
  auto client = NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
  ASSERT_TRUE(client->Start(nullptr).ok());
  for (int64_t rows : {1, 4096}) {  // 4 KiB and 16 MiB.
    Message request = EchoRequest(rows, 1024, 5);
    Message copy;
    copy.payload = request.payload.Clone();
    auto r = client->SendSync(server.address(), std::move(request), Ms(30000));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_TRUE(SamePayload(*r, copy));
  }
  // A request the server will never answer; then the server dies.
  std::atomic<bool> finished{false};
  Status result;
  const auto start = Clock::now();
  Clock::time_point finished_at;
  constexpr Ms kDeadline(5000);
  client->Send(server.address(), EchoRequest(1, 16, 1, 999), kDeadline,
               [&](StatusOr<Message> r) {
                 result = r.status();
                 finished_at = Clock::now();
                 finished = true;
               });
  std::this_thread::sleep_for(Ms(200));
  server.Kill();
  while (!finished.load() && Clock::now() < start + kDeadline + Ms(3000)) {
    std::this_thread::sleep_for(Ms(10));
  }
  ASSERT_TRUE(finished.load()) << "no completion after the deadline: a hang";
  EXPECT_FALSE(result.ok());
  EXPECT_LE(finished_at - start, kDeadline + Ms(500));
  std::cout << "peer killed mid-request: " << result.ToString() << " after "
            << std::chrono::duration_cast<Ms>(finished_at - start).count()
            << " ms\n";
  client->Shutdown();
}

TEST(DataPlaneAcrossProcessesTest, ConcurrentLargeEchoesComeBackIntact) {
  // 16 MiB rendezvous payloads, 4 in flight, each with its own contents:
  // receive buffers are reused from pools on both sides, so a buffer handed
  // out while the transport still reads or writes it shows up here.
  RemoteServer server;
  ASSERT_FALSE(server.address().empty()) << "remote server did not start";
  auto client = NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
  ASSERT_TRUE(client->Start(nullptr).ok());
  constexpr int kRequests = 48, kWindow = 4;
  std::mutex mu;
  std::condition_variable cv;
  int in_flight = 0, done = 0;
  std::vector<std::string> failures;
  for (int i = 0; i < kRequests; ++i) {
    {
      std::unique_lock<std::mutex> lock(mu);
      ASSERT_TRUE(
          cv.wait_for(lock, Ms(30000), [&] { return in_flight < kWindow; }));
      ++in_flight;
    }
    Message request = EchoRequest(4096, 1024, 100 + i);
    auto expected = std::make_shared<Tensor>(request.payload.Clone());
    client->Send(
        server.address(), std::move(request), Ms(30000),
        [&, i, expected](StatusOr<Message> r) {
          std::string failure;
          if (!r.ok()) {
            failure = r.status().ToString();
          } else if (r->payload.num_bytes() != expected->num_bytes() ||
                     std::memcmp(r->payload.data(), expected->data(),
                                 expected->num_bytes()) != 0) {
            failure = "payload differs";
          }
          std::lock_guard<std::mutex> lock(mu);
          if (!failure.empty()) {
            failures.push_back("echo " + std::to_string(i) + ": " + failure);
          }
          --in_flight;
          ++done;
          cv.notify_all();
        });
  }
  std::unique_lock<std::mutex> lock(mu);
  ASSERT_TRUE(cv.wait_for(lock, Ms(60000), [&] { return done == kRequests; }));
  EXPECT_TRUE(failures.empty())
      << failures.size() << " bad echoes, first " << failures.front();
  lock.unlock();
  // Processes of one host talk over shared memory (active messages) and
  // CMA (rendezvous), not TCP, unless UCX_TLS says otherwise.
  const std::string lanes = client->ConnectionInfo(server.address());
  std::cout << "lanes: " << lanes << "\n";
  if (std::getenv("UCX_TLS") == nullptr) {
    EXPECT_TRUE(lanes.find("am=sysv/memory") != std::string::npos ||
                lanes.find("am=posix/memory") != std::string::npos)
        << lanes;
    EXPECT_NE(lanes.find("rma_bw=cma/memory"), std::string::npos) << lanes;
    EXPECT_EQ(lanes.find("tcp"), std::string::npos) << lanes;
  }
  EXPECT_EQ(client->ConnectionInfo("127.0.0.1:1"), "");
  client->Shutdown();
}

// --lanes NAME=VALUE FILE: a server and a client in this process, both
// with ucx_env {NAME: VALUE} (as transport.ucx gives it), one 16 MiB echo,
// then the client's ConnectionInfo into FILE.
int ReportLanes(const std::string& setting, const char* out_file) {
  const size_t eq = setting.find('=');
  DataPlaneOptions options = testing::TestDataPlaneOptions();
  options.ucx_env[setting.substr(0, eq)] = setting.substr(eq + 1);
  std::vector<Reply> held;
  std::mutex mu;
  auto server = NewUcxDataPlane(options).value();
  auto client = NewUcxDataPlane(options).value();
  Status s = server->Start(EchoHandler(&held, &mu));
  if (s.ok()) s = client->Start(nullptr);
  if (s.ok()) {
    s = client
            ->SendSync(server->address(), EchoRequest(4096, 1024, 3), Ms(30000))
            .status();
  }
  std::ofstream out(out_file);
  out << (s.ok() ? client->ConnectionInfo(server->address()) : s.ToString());
  client->Shutdown();
  server->Shutdown();
  return s.ok() ? 0 : 1;
}

// The lanes a child process reports (ReportLanes) for `setting`, with
// `environment` ("" or NAME=VALUE) added to this process's environment
// less UCX_TLS and UCX_CMA_MEMORY_INVALIDATE.
std::string LanesInAChild(const std::string& setting,
                          const std::string& environment) {
  const std::string file =
      ::testing::TempDir() + "/dp_lanes_" + std::to_string(::getpid()) + "_" +
      std::to_string(std::hash<std::string>()(setting + environment));
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string var = *e;
    if (var.rfind("UCX_TLS=", 0) == 0 ||
        var.rfind("UCX_CMA_MEMORY_INVALIDATE=", 0) == 0) {
      continue;
    }
    env.push_back(var);
  }
  if (!environment.empty()) env.push_back(environment);
  std::vector<char*> envp;
  for (std::string& var : env) envp.push_back(var.data());
  envp.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execle(g_self_binary.c_str(), g_self_binary.c_str(), "--lanes",
             setting.c_str(), file.c_str(), nullptr, envp.data());
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  std::ifstream in(file);
  std::string lanes((std::istreambuf_iterator<char>(in)),
                    std::istreambuf_iterator<char>());
  std::remove(file.c_str());
  return "exit " + std::to_string(WEXITSTATUS(status)) + ": " + lanes;
}

TEST(DataPlaneOptionsTest, TransportUcxSettingsBecomeUcxEnv) {
  auto loaded = ParseConfig(
      "transport:\n  ucx_tls: tcp\n  ucx:\n    UCX_NET_DEVICES: lo\n", "t.yaml",
      {"transport.ucx.UCX_RNDV_THRESH=8k"});
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const DataPlaneOptions options =
      DataPlaneOptionsFrom(loaded->config, testing::kTestClusterSecret);
  EXPECT_EQ(options.secret, testing::kTestClusterSecret);
  EXPECT_EQ(options.ucx_tls, "tcp");
  const std::map<std::string, std::string> expected = {
      {"UCX_NET_DEVICES", "lo"}, {"UCX_RNDV_THRESH", "8k"}};
  EXPECT_EQ(options.ucx_env, expected);
}

// transport.ucx reaches UCX: UCX_CMA_MEMORY_INVALIDATE=n takes CMA out of
// the rendezvous lanes (peer error handling then rules it out), where the
// data plane's default (y) keeps it; the environment's value wins.
TEST(DataPlaneAcrossProcessesTest, TransportUcxSettingsReachUcx) {
  const std::string by_default =
      LanesInAChild("UCX_RNDV_THRESH=auto", /*environment=*/"");
  EXPECT_NE(by_default.find("exit 0: "), std::string::npos) << by_default;
  EXPECT_NE(by_default.find("rma_bw=cma/memory"), std::string::npos)
      << by_default;

  const std::string without_cma = LanesInAChild("UCX_CMA_MEMORY_INVALIDATE=n",
                                                /*environment=*/"");
  EXPECT_NE(without_cma.find("exit 0: "), std::string::npos) << without_cma;
  EXPECT_EQ(without_cma.find("cma"), std::string::npos) << without_cma;
  EXPECT_NE(without_cma.find("rma_bw="), std::string::npos) << without_cma;

  const std::string environment_wins = LanesInAChild(
      "UCX_CMA_MEMORY_INVALIDATE=n", "UCX_CMA_MEMORY_INVALIDATE=y");
  EXPECT_NE(environment_wins.find("rma_bw=cma/memory"), std::string::npos)
      << environment_wins;
  std::cout << "default: " << by_default
            << "\nUCX_CMA_MEMORY_INVALIDATE=n: " << without_cma << "\n";
}

int ServeForever(const char* address_file) {
  std::vector<Reply> held;
  std::mutex mu;
  auto server = NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
  Status s = server->Start(EchoHandler(&held, &mu));
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  {
    std::ofstream out(std::string(address_file) + ".tmp");
    out << server->address() << "\n";
  }
  std::rename((std::string(address_file) + ".tmp").c_str(), address_file);
  while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
}

}  // namespace
}  // namespace switchyard::transport::data_plane_testing

int main(int argc, char** argv) {
  namespace dp = switchyard::transport::data_plane_testing;
  switchyard::InitLogging(argv[0]);
  dp::g_self_binary = argv[0];
  if (argc == 3 && std::strcmp(argv[1], "--serve") == 0) {
    return dp::ServeForever(argv[2]);
  }
  if (argc == 4 && std::strcmp(argv[1], "--lanes") == 0) {
    return dp::ReportLanes(argv[2], argv[3]);
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
