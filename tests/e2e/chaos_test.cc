// Crash chaos at the worker level: a cluster training with a checkpoint at
// every step has a random worker SIGKILLed at a random instant, again and
// again (SWITCHYARD_CHAOS_ITERATIONS, default 20; `make chaos` runs 200).
// After every kill the newest committed checkpoint verifies (every chunk,
// manifest and committed digest), and the next round resumes from it and
// trains on. Only committed data is ever loaded: the coordinator resumes
// from a commit, and every shard it names verifies against the digest it
// committed.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "tests/testing/files.h"
#include "tests/testing/processes.h"
#include "tests/testing/run_command.h"

namespace switchyard {
namespace {

using testing::ReadFile;

TEST(ChaosTest, WorkersKilledDuringCheckpointsLeaveCommittedOnesWhole) {
  const char* env = std::getenv("SWITCHYARD_CHAOS_ITERATIONS");
  const int iterations = env ? std::atoi(env) : 20;
  const std::string dir =
      ::testing::TempDir() + "/switchyard_chaos_" + std::to_string(::getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir + "/data");
  {
    std::ofstream data(dir + "/data/text.txt");
    for (int i = 0; i < 2000; ++i) data << "chaos line " << i << " of text.\n";
  }
  const std::vector<std::string> flags = {
      "--config",  std::string(SWITCHYARD_SOURCE_DIR) + "/examples/tiny.yaml",
      "--data",    dir + "/data",
      "--run-dir", dir + "/run",
      "--set",     "training.steps=1000000",
      "--set",     "training.log_every=1",
      "--set",     "training.eval_every=0",
      "--set",     "checkpoint.every=1",
      "--set",     "checkpoint.keep_last=3",
      "--set",     "cluster.heartbeat_ms=100",
      "--set",     "transport.request_timeout_ms=5000"};
  std::mt19937 rng(4242);
  int64_t last_resumed = -1;
  int resumed_rounds = 0;
  for (int i = 0; i < iterations; ++i) {
    SCOPED_TRACE("round " + std::to_string(i));
    const std::string log = dir + "/up-" + std::to_string(i) + ".log";
    std::vector<std::string> args = {SWITCHYARD_BINARY, "up", "--workers", "3",
                                     "--trainers",      "2"};
    args.insert(args.end(), flags.begin(), flags.end());
    const pid_t up = testing::Spawn(args, log);
    // Train until a checkpoint commits in this round, then kill a worker
    // a random moment later (often mid-write: one is written every step).
    static const std::regex kCommit(R"(checkpoint (\d+) committed)");
    static const std::regex kResume(R"(resuming at step (\d+))");
    const std::string victim = "worker-" + std::to_string(rng() % 3);
    const std::regex pid_re("\\n" + victim + R"( +ALIVE +\S+ +(\d+))");
    pid_t pid = -1;
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(90);
    while (std::chrono::steady_clock::now() < deadline && pid < 0) {
      const std::string text = ReadFile(log);
      std::smatch m;
      if (std::regex_search(text, kCommit) &&
          std::regex_search(text, m, pid_re)) {
        pid = std::stoi(m[1]);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ASSERT_GT(pid, 0) << ReadFile(log);
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 300));
    ::kill(pid, SIGKILL);
    const int code = testing::WaitExit(up, std::chrono::seconds(60));
    if (code == -1) testing::StopAndReap(up);
    const std::string text = ReadFile(log);
    EXPECT_NE(code, -1) << "the cluster did not stop\n" << text;
    std::smatch m;
    if (std::regex_search(text, m, kResume)) {
      const int64_t step = std::stoll(m[1]);
      EXPECT_GT(step, last_resumed) << "each round resumes further on";
      last_resumed = step;
      ++resumed_rounds;
    }
    // The newest committed checkpoint verifies, every byte of it.
    const auto verify =
        testing::RunSwitchyard("ckpt verify --run-dir " + dir + "/run");
    ASSERT_EQ(verify.exit_code, 0) << verify.output << "\n" << text;
  }
  EXPECT_GE(resumed_rounds, iterations - 1) << "rounds after the first resume";
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace switchyard
