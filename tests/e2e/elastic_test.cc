// Elastic runs end to end (DESIGN.md, "Failures and elasticity"): workers
// join and are drained while `switchyard up` trains, their shards move live
// at step boundaries, and the run ends bit-identical to the single-process
// reference with nothing rolled back and no step redone.
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "control.pb.h"
#include "tests/testing/corpus_dir_test.h"
#include "tests/testing/files.h"
#include "tests/testing/processes.h"
#include "tests/testing/run_command.h"

namespace switchyard {
namespace {

using testing::Digests;
using testing::RunSwitchyard;

class ElasticTest : public testing::CorpusDirTest {
 protected:
  ElasticTest() : CorpusDirTest("elastic") {}

  // The tiny model, top-2 with jitter and two micro-batches, as the
  // training tests; 120 steps, checkpoints every 10.
  std::string Flags() const {
    return " --config " + std::string(SWITCHYARD_SOURCE_DIR) +
           "/examples/tiny.yaml --data " + dir_ +
           "/data --set training.steps=120 --set training.micro_batches=2"
           " --set model.top_k=2 --set model.router_jitter=0.01"
           " --set training.log_every=5 --set training.eval_every=40"
           " --set cluster.trainers=2 --set training.threads=1"
           " --set checkpoint.every=10 --set cluster.heartbeat_ms=100"
           " --set cluster.lease_ms=1000";
  }
  std::vector<std::string> Args(const std::string& flags) const {
    std::vector<std::string> args;
    std::istringstream in(flags);
    for (std::string f; in >> f;) args.push_back(f);
    return args;
  }
  // Waits until `log` holds `text` (or the deadline).
  bool WaitFor(const std::string& log, const std::string& text,
               std::chrono::seconds within = std::chrono::seconds(90)) {
    const auto deadline = std::chrono::steady_clock::now() + within;
    while (std::chrono::steady_clock::now() < deadline) {
      if (testing::ReadFile(log).find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }
  // The reference's digests after training with `flags`.
  std::map<std::string, std::string> ReferenceDigests(const std::string& flags,
                                                      int timeout_s = 180) {
    const auto reference =
        RunSwitchyard("train --reference --sample-bytes 0" + flags, timeout_s);
    EXPECT_EQ(reference.exit_code, 0) << reference.output;
    return Digests(reference.output);
  }
  // `switchyard up` with `workers` workers and 2 trainers on `flags`, its
  // run directory dir_/run and its output in `log`.
  pid_t StartUp(int workers, const std::string& flags, const std::string& log) {
    std::vector<std::string> args = {
        SWITCHYARD_BINARY, "up", "--workers", std::to_string(workers),
        "--trainers",      "2",  "--run-dir", dir_ + "/run"};
    for (const std::string& a : Args(flags)) args.push_back(a);
    return testing::Spawn(args, log);
  }
  static int Count(const std::string& text, const std::regex& re) {
    return static_cast<int>(
        std::distance(std::sregex_iterator(text.begin(), text.end(), re),
                      std::sregex_iterator()));
  }
};

// `up` trains with 2 workers; past step 25 a third worker is started by
// hand (`switchyard worker`, as a systemd unit or a scaled-up StatefulSet
// would), past step 60 worker-0 is drained (`switchyard drain`), past step
// 90 the new worker is stopped with SIGTERM (systemd stop, a Kubernetes
// preStop), which drains it too. Each move pauses the trainers at a step
// boundary and hands the shards over live: nothing rolls back, no step is
// redone, the drained workers exit 0, and the run ends bit-identical to the
// reference trained straight through.
TEST_F(ElasticTest, JoinsAndDrainsMidRunMoveShardsLiveBitForBit) {
  const auto want = ReferenceDigests(Flags());
  ASSERT_EQ(want.size(), 18u);
  const std::string run = dir_ + "/run", up_log = dir_ + "/up.log",
                    joiner_log = dir_ + "/worker-2.log";
  const pid_t up = StartUp(2, Flags(), up_log);
  ASSERT_TRUE(WaitFor(up_log, "[trainer-0] step 25/"))
      << testing::ReadFile(up_log);
  // While it trains, the workers' heartbeats carry their shards' tokens:
  // `status` shows them, and how evenly they fall.
  std::string status_text;
  const auto status_deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(20000);
  while (std::chrono::steady_clock::now() < status_deadline) {
    status_text =
        RunSwitchyard("status --run-dir " + dir_ + "/run" + Flags(), 30).output;
    if (status_text.find("token load per worker") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_NE(status_text.find("token load per worker"), std::string::npos)
      << status_text;

  // The joiner: the run's configuration, the coordinator `up` started.
  std::string address;
  std::ifstream(run + "/coordinator.addr") >> address;
  ASSERT_FALSE(address.empty());
  std::vector<std::string> worker_args = {SWITCHYARD_BINARY, "worker", "--name",
                                          "worker-2"};
  for (const std::string& a : Args(Flags() + " --set cluster.state_dir=" + run +
                                   " --set cluster.secret_file=" + run +
                                   "/secret --set cluster.workers=2 --set "
                                   "cluster.coordinator_address=" +
                                   address)) {
    worker_args.push_back(a);
  }
  const pid_t joiner = testing::Spawn(worker_args, joiner_log);
  EXPECT_TRUE(WaitFor(joiner_log, "took over"))
      << testing::ReadFile(joiner_log);

  ASSERT_TRUE(WaitFor(up_log, "[trainer-0] step 60/"));
  const auto drain =
      RunSwitchyard("drain worker-0 --run-dir " + run + Flags(), 60);
  EXPECT_EQ(drain.exit_code, 0) << drain.output;
  EXPECT_NE(drain.output.find("worker-0 drained and left"), std::string::npos)
      << drain.output;

  ASSERT_TRUE(WaitFor(up_log, "[trainer-0] step 90/"));
  ASSERT_EQ(::kill(joiner, SIGTERM), 0);
  EXPECT_EQ(testing::WaitExit(joiner, std::chrono::seconds(60)), 0)
      << testing::ReadFile(joiner_log);

  const int code = testing::WaitExit(up, std::chrono::seconds(120));
  if (code == -1) testing::StopAndReap(up);
  const std::string text = testing::ReadFile(up_log);
  const std::string joined = testing::ReadFile(joiner_log);
  EXPECT_EQ(code, 0) << text;
  EXPECT_EQ(Digests(text + joined), want) << text << joined;

  // Three moves, each a pause at a boundary both trainers continue from.
  static const std::regex kContinued(
      R"(trainer-[01]: epoch \d+ continues at step \d+ after a pause of \d+ ms)");
  EXPECT_EQ(Count(text, kContinued), 6) << text;
  // Nothing rolled back, no recovery, no step redone; nobody restarted.
  EXPECT_EQ(text.find("rolling back"), std::string::npos) << text;
  EXPECT_EQ(text.find("recovery 1"), std::string::npos) << text;
  EXPECT_EQ(text.find("[up] restarting"), std::string::npos) << text;
  EXPECT_EQ(joined.find("rolling back"), std::string::npos) << joined;
  // The drained workers handed everything over and left cleanly.
  EXPECT_NE(text.find("worker-0: drained"), std::string::npos) << text;
  EXPECT_NE(joined.find("worker-2: drained"), std::string::npos) << joined;
  EXPECT_NE(text.find("worker-0 (pid"), std::string::npos);
  EXPECT_EQ(text.find("not a clean exit"), std::string::npos) << text;
}

// A drain the other workers cannot hold is refused, saying why, and the
// worker keeps serving its shards.
TEST_F(ElasticTest, ADrainTheOthersCannotHoldIsRefused) {
  const std::string run = dir_ + "/run", up_log = dir_ + "/up.log";
  // Each worker offers 7 MB; the tiny model's shards take about 11 MB.
  std::vector<std::string> up_args = {
      SWITCHYARD_BINARY, "up", "--workers", "2",
      "--trainers",      "0",  "--run-dir", run};
  for (const std::string& a :
       Args(Flags() + " --set cluster.worker_capacity_bytes=7000000")) {
    up_args.push_back(a);
  }
  const pid_t up = testing::Spawn(up_args, up_log);
  ASSERT_TRUE(WaitFor(up_log, "[up] cluster ready"))
      << testing::ReadFile(up_log);
  const auto drain =
      RunSwitchyard("drain worker-0 --run-dir " + run + Flags(), 60);
  EXPECT_EQ(drain.exit_code, 1) << drain.output;
  EXPECT_NE(drain.output.find("RESOURCE_EXHAUSTED: cannot drain worker-0"),
            std::string::npos)
      << drain.output;
  EXPECT_NE(drain.output.find("it keeps serving"), std::string::npos)
      << drain.output;
  const auto status = RunSwitchyard("status --run-dir " + run + Flags(), 30);
  EXPECT_EQ(status.exit_code, 0) << status.output;
  EXPECT_TRUE(std::regex_search(status.output,
                                std::regex(R"(\nworker-0 +ALIVE .* 9 +)")))
      << status.output;
  // An unknown worker is named as such.
  const auto unknown =
      RunSwitchyard("drain worker-7 --run-dir " + run + Flags(), 60);
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_NE(unknown.output.find("no worker named 'worker-7'"),
            std::string::npos)
      << unknown.output;
  testing::StopAndReap(up);
}

// A cluster that can no longer hold the model waits, saying what is
// missing, and goes on by itself when capacity returns: 2 workers of 7 MB
// each hold the tiny model (about 11 MB); one paused (SIGSTOP) past its
// lease is fenced and the other cannot hold everything. `status` shows the
// placement error and the trainers wait (no exit, no restart); resumed
// (SIGCONT), the worker registers again, the cluster rolls back to the
// newest committed checkpoint and the run ends bit-identical to the
// reference.
TEST_F(ElasticTest, ALostCapacityIsWaitedForAndTheRunGoesOnWhenItReturns) {
  const std::string flags =
      Flags() + " --set cluster.worker_capacity_bytes=7000000";
  const auto want = ReferenceDigests(flags);
  ASSERT_FALSE(want.empty());
  const std::string run = dir_ + "/run", up_log = dir_ + "/up.log";
  const pid_t up = StartUp(2, flags, up_log);
  ASSERT_TRUE(WaitFor(up_log, "[trainer-0] step 30/"))
      << testing::ReadFile(up_log);

  const auto status = [&] {
    control::StatusResponse s;
    const auto out =
        RunSwitchyard("status --json --run-dir " + run + flags, 30);
    EXPECT_TRUE(
        google::protobuf::util::JsonStringToMessage(out.output, &s).ok())
        << out.output;
    return s;
  };
  pid_t victim = -1;
  const control::StatusResponse before = status();
  for (const auto& m : before.members()) {
    if (m.name() == "worker-1") victim = m.pid();
  }
  ASSERT_GT(victim, 0);
  ASSERT_EQ(::kill(victim, SIGSTOP), 0);
  // Fenced after its lease (1 s): the one left cannot hold the model.
  std::string shown;
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline &&
         shown.find("placement error: cannot place") == std::string::npos) {
    shown = RunSwitchyard("status --run-dir " + run + flags, 30).output;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_NE(shown.find("placement error: cannot place"), std::string::npos)
      << shown;
  // Waited for: two seconds on, nobody gave up or was restarted.
  std::this_thread::sleep_for(std::chrono::seconds(2));
  int up_status = 0;
  EXPECT_EQ(::waitpid(up, &up_status, WNOHANG), 0);
  ASSERT_EQ(::kill(victim, SIGCONT), 0);

  const int code = testing::WaitExit(up, std::chrono::seconds(120));
  if (code == -1) testing::StopAndReap(up);
  const std::string text = testing::ReadFile(up_log);
  EXPECT_EQ(code, 0) << text;
  EXPECT_EQ(Digests(text), want) << text;
  EXPECT_EQ(text.find("[up] restarting"), std::string::npos) << text;
  // The trainers recovered once capacity was back: the worker's new
  // process registered, and the rollback brought them back together.
  EXPECT_NE(text.find("worker-1 registered"), std::string::npos) << text;
  EXPECT_GE(Count(text, std::regex(R"(trainer-0: recovery \d+: )")), 1) << text;
}

// Scale: 16 worker processes on this machine. `up` starts 4; 12 more join
// one at a time while the run trains, and 8 workers, drawn at random (a
// fixed seed) among those serving, are drained in between, in random
// order. Every move is live; the run ends bit-identical to the reference.
TEST_F(ElasticTest, SixteenWorkersJoinAndDrainInRandomOrder) {
  const std::string flags = Flags() + " --set training.steps=400";
  const auto want = ReferenceDigests(flags, 300);
  ASSERT_FALSE(want.empty());
  const std::string run = dir_ + "/run", up_log = dir_ + "/up.log";
  const pid_t up = StartUp(4, flags, up_log);
  ASSERT_TRUE(WaitFor(up_log, "[trainer-0] step 10/"))
      << testing::ReadFile(up_log);
  std::string address;
  std::ifstream(run + "/coordinator.addr") >> address;

  std::mt19937 random(22);
  std::vector<std::string> serving = {"worker-0", "worker-1", "worker-2",
                                      "worker-3"};
  std::map<std::string, pid_t> joined;
  // 12 joins and 8 drains, a drain never leaving fewer than 3 serving.
  std::vector<bool> is_join(12, true);
  is_join.insert(is_join.end(), 8, false);
  std::shuffle(is_join.begin() + 1, is_join.end(), random);
  int next_worker = 4, step = 15, drains = 0;
  for (bool join : is_join) {
    if (!join && serving.size() <= 3) join = true;
    if (join && next_worker == 16) continue;
    step += 15;
    ASSERT_TRUE(
        WaitFor(up_log, "[trainer-0] step " + std::to_string(step) + "/"))
        << testing::ReadFile(up_log);
    if (join) {
      const std::string name = "worker-" + std::to_string(next_worker++);
      std::vector<std::string> args = {SWITCHYARD_BINARY, "worker", "--name",
                                       name, "--drain-on-stop=false"};
      for (const std::string& a :
           Args(flags + " --set cluster.state_dir=" + run +
                " --set cluster.secret_file=" + run +
                "/secret --set cluster.coordinator_address=" + address)) {
        args.push_back(a);
      }
      joined[name] = testing::Spawn(args, dir_ + "/" + name + ".log");
      serving.push_back(name);
    } else {
      const size_t pick = random() % serving.size();
      const std::string name = serving[pick];
      serving.erase(serving.begin() + static_cast<long>(pick));
      const auto drain =
          RunSwitchyard("drain " + name + " --run-dir " + run + flags, 120);
      EXPECT_EQ(drain.exit_code, 0) << name << ": " << drain.output;
      ++drains;
    }
  }
  EXPECT_EQ(next_worker, 16);
  EXPECT_GE(drains, 6);
  const int code = testing::WaitExit(up, std::chrono::seconds(300));
  if (code == -1) testing::StopAndReap(up);
  std::string text = testing::ReadFile(up_log);
  EXPECT_EQ(code, 0) << text;
  for (const auto& [name, pid] : joined) {
    testing::StopAndReap(pid);
    text += testing::ReadFile(dir_ + "/" + name + ".log");
  }
  EXPECT_EQ(Digests(text), want);
  EXPECT_EQ(text.find("rolling back"), std::string::npos);
  EXPECT_EQ(text.find("recovery 1"), std::string::npos);
  EXPECT_EQ(text.find("not a clean exit"), std::string::npos);
  static const std::regex kTookOver(R"(worker-\d+: took over \d+ shards live)");
  EXPECT_GE(Count(text, kTookOver), 12);
}

}  // namespace
}  // namespace switchyard
