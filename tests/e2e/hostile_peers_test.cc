// A real coordinator process against peers that do not know the secret:
// floods of unauthenticated connections of every kind, and a coordinator out
// of file descriptors. It must stay small, keep answering `status`, and log
// a bounded number of lines.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "cli/status_client.h"
#include "tests/testing/processes.h"
#include "tests/testing/sockets.h"
#include "transport/control/auth.h"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

// A non-blocking socket connected to the coordinator; what it sends is sent
// as far as the socket takes it, errors ignored (the server may have closed).
class HostileSocket {
 public:
  explicit HostileSocket(uint16_t port) {
    fd_ = testing::ConnectToLoopback(port, &connected_);
    ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) | O_NONBLOCK);
  }
  ~HostileSocket() { ::close(fd_); }
  bool connected() const { return connected_; }
  void Send(const std::string& bytes) {
    size_t sent = 0;
    while (sent < bytes.size()) {
      const ssize_t n =
          ::send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) return;
      sent += n;
    }
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
};

std::string FrameHeader(uint32_t length) {
  std::string header = "SYC1";
  for (int shift : {24, 16, 8, 0}) header += static_cast<char>(length >> shift);
  return header;
}

// Resident set size of `pid` in bytes, from /proc.
int64_t ResidentBytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  while (in >> key) {
    if (key == "VmRSS:") {
      int64_t kib = 0;
      in >> kib;
      return kib * 1024;
    }
    in.ignore(1 << 20, '\n');
  }
  return -1;
}

class HostilePeersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/switchyard_hostile_" +
           std::to_string(::getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    log_ = dir_ + "/coordinator.log";
    ASSERT_TRUE(control::WriteNewSecretFile(dir_ + "/secret").ok());
    secret_ = *control::ReadSecretFile(dir_ + "/secret");
  }
  void TearDown() override {
    testing::StopAndReap(pid_);
    if (HasFailure()) {
      std::ifstream in(log_);
      std::cerr << "---- coordinator log (head) ----\n";
      std::string line;
      for (int i = 0; i < 200 && std::getline(in, line); ++i) {
        std::cerr << line << "\n";
      }
    }
    std::filesystem::remove_all(dir_);
  }

  // Starts a coordinator, with at most `max_files` open descriptors when
  // given, and waits for its address.
  void StartCoordinator(int max_files = 0) {
    std::string command =
        std::string(SWITCHYARD_BINARY) + " coordinator --state-dir " + dir_ +
        " --secret-file " + dir_ + "/secret --coordinator 127.0.0.1:0";
    command = "exec " + command;  // The coordinator is the child itself.
    if (max_files > 0) {
      command = "ulimit -n " + std::to_string(max_files) + " && " + command;
    }
    pid_ = testing::Spawn({"/bin/sh", "-c", command}, log_);
    const auto deadline = Clock::now() + Ms(20000);
    while (Clock::now() < deadline) {
      std::ifstream in(dir_ + "/coordinator.addr");
      std::string addr;
      if (in >> addr) {
        address_ = *ParseHostPort(addr);
        return;
      }
      std::this_thread::sleep_for(Ms(50));
    }
    FAIL() << "the coordinator did not publish its address";
  }

  bool Running() { return ::waitpid(pid_, nullptr, WNOHANG) == 0; }

  // Milliseconds one `status` takes, or -1 when it fails.
  int64_t TimeStatus() {
    const auto start = Clock::now();
    auto status = cli::FetchStatus(address_, secret_, Ms(2000));
    if (!status.ok()) {
      ADD_FAILURE() << status.status().ToString();
      return -1;
    }
    return std::chrono::duration_cast<Ms>(Clock::now() - start).count();
  }

  int CountLogLines(const std::string& needle) {
    std::ifstream in(log_);
    std::string line;
    int n = 0;
    while (std::getline(in, line)) n += line.find(needle) != std::string::npos;
    return n;
  }

  std::string dir_, log_, secret_;
  HostPort address_;
  pid_t pid_ = -1;
};

// 1,000 connections that never authenticate: idle, announcing near-64 MiB
// frames and sending 512 KiB of them, sending garbage, and trickling a
// handshake-sized frame. Before the handshake limit each large frame was
// buffered (the coordinator grew by the flood's size); now it stays within
// 64 MB of where it started and `status` answers.
TEST_F(HostilePeersTest, AFloodOfUnauthenticatedConnectionsIsBounded) {
  StartCoordinator();
  ASSERT_GT(TimeStatus(), -1);
  const int64_t rss_before = ResidentBytes(pid_);
  const std::string big = FrameHeader(64u << 20) + std::string(512 << 10, 'x');
  const std::string garbage(4096, '\xff');
  const std::string trickle = FrameHeader(3000) + std::string(100, 'y');
  std::vector<std::unique_ptr<HostileSocket>> flood;
  for (int i = 0; i < 1000; ++i) {
    flood.push_back(std::make_unique<HostileSocket>(address_.port));
    ASSERT_TRUE(flood.back()->connected()) << i;
    switch (i % 4) {
      case 0:
        break;  // Idle.
      case 1:
        flood.back()->Send(big);
        break;
      case 2:
        flood.back()->Send(garbage);
        break;
      case 3:
        flood.back()->Send(trickle);
        break;
    }
  }
  std::this_thread::sleep_for(Ms(500));
  const int64_t status_ms = TimeStatus();
  const int64_t rss_after = ResidentBytes(pid_);
  std::cout << "flood of 1000: coordinator RSS " << rss_before / (1 << 20)
            << " MB -> " << rss_after / (1 << 20) << " MB, status answered in "
            << status_ms << " ms\n";
  EXPECT_TRUE(Running());
  EXPECT_GE(status_ms, 0);
  EXPECT_LT(rss_after - rss_before, int64_t{64} << 20);
}

// With 64 descriptors the coordinator runs out while 300 peers hold their
// connections: it backs off instead of spinning on accept and logs a few
// lines (before: a line per failed accept, millions), then serves again once
// the peers are gone.
TEST_F(HostilePeersTest, OutOfDescriptorsTheCoordinatorBacksOff) {
  StartCoordinator(/*max_files=*/64);
  ASSERT_GT(TimeStatus(), -1);
  {
    std::vector<std::unique_ptr<HostileSocket>> flood;
    for (int i = 0; i < 300; ++i) {
      flood.push_back(std::make_unique<HostileSocket>(address_.port));
    }
    std::this_thread::sleep_for(Ms(2000));
    EXPECT_TRUE(Running());
  }
  const int accept_lines = CountLogLines("accept failed");
  EXPECT_GE(accept_lines, 1);  // It did run out.
  EXPECT_LE(accept_lines, 3);
  // Once the peers are gone it serves again (backoff is at most 1 s).
  auto status = cli::FetchStatus(address_, secret_, Ms(5000));
  EXPECT_TRUE(status.ok()) << status.status().ToString();
}

}  // namespace
}  // namespace switchyard
