// Switchyard and PyTorch (python/switchyard, Debian's python3-torch): an
// export loads into PyTorch by itself from its config.json and computes the
// loss Switchyard computes on the same text; a file saved from that PyTorch
// module (its state_dict) imports back into Switchyard unchanged. With the
// binding (switchyard._core), PyTorch trainers train experts that live on a
// real cluster (`up --trainers 0`): the same gradients and updates as plain
// PyTorch, bit-identical runs, and a killed worker an exception.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "tests/testing/files.h"
#include "tests/testing/processes.h"
#include "tests/testing/run_command.h"

namespace switchyard {
namespace {

using testing::CommandResult;
using testing::RunSwitchyard;

// Debian's interpreter with python3-torch, and the package as the build
// holds it (python/switchyard's sources beside the binding).
std::vector<std::string> PythonCommand() {
  return {"/usr/bin/env", "PYTHONDONTWRITEBYTECODE=1",
          std::string("PYTHONPATH=") + SWITCHYARD_PYTHON_PATH,
          SWITCHYARD_PYTHON};
}

CommandResult RunPython(const std::string& args, int timeout_s = 300) {
  std::string line;
  for (const auto& a : PythonCommand()) line += a + " ";
  return testing::RunCommand(line + args, timeout_s);
}

std::string Script(const std::string& name) {
  return std::string(SWITCHYARD_SOURCE_DIR) + "/tests/python/" + name;
}

// The number after `key` in `output` (NaN when absent).
double NumberAfter(const std::string& output, const std::string& key) {
  const std::regex number(key + "\\s*([-+0-9.eE]+)");
  std::smatch m;
  if (!std::regex_search(output, m, number)) return std::nan("");
  return std::stod(m[1]);
}

class PyTorchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/switchyard_pytorch_" +
           std::to_string(::getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_ + "/data");
    testing::WriteTwoLanguageCorpus(dir_ + "/data");
    // Held-out text: none of it is in the training data.
    std::ofstream text(dir_ + "/held_out.txt");
    for (int i = 0; i < 60; ++i) {
      text << "pack my box with " << i * 7 << " dozen liquor jugs; "
           << "в чащах юга жил бы цитрус " << i << "\n";
    }
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string dir_;
};

struct Variant {
  std::string name;
  std::string config;  // In examples/.
  std::string flags;
  int dense_tensors = 0;  // In the model's DenseLayout.
};

// Per model variant: train 20 steps on a cluster, export checkpoint 20, and
// compare Switchyard's loss on the held-out text (the single-process
// reference started from the export) with the PyTorch module's from
// load_export; then save that module's state_dict with save_file and start
// from the file instead: `ckpt import` takes every tensor, and the loss is
// the same to the last digit.
TEST_F(PyTorchTest, AnExportLoadsIntoPyTorchWithSwitchyardsLoss) {
  const std::string base = " --data " + dir_ +
                           "/data --set training.steps=20"
                           " --set training.threads=1"
                           " --set training.batch_size=4";
  const Variant variants[] = {
      // The demo model (rotary positions, 8 experts, top-1).
      {"demo", "demo.yaml", "", 37},
      // Top-2 with capacity in training, a larger one at evaluation.
      {"top2_capacity", "tiny.yaml",
       " --set model.top_k=2 --set model.capacity_factor=1.0"
       " --set training.eval_capacity_factor=1.5",
       38},
      // SwiGLU without biases, LayerNorm, rotary positions, experts in two
      // shards each (joined by the export).
      {"swiglu_rotary", "tiny.yaml",
       " --set model.activation=swiglu --set model.norm=layernorm"
       " --set model.positions=rotary --set model.expert_bias=false"
       " --set model.shards_per_expert=2",
       42}};
  for (const Variant& v : variants) {
    SCOPED_TRACE(v.name);
    const std::string run = dir_ + "/" + v.name, out = run + "-export";
    const std::string flags = " --config " +
                              std::string(SWITCHYARD_SOURCE_DIR) +
                              "/examples/" + v.config + base + v.flags;
    const auto trained = RunSwitchyard(
        "up --workers 2 --run-dir " + run + flags +
            " --set checkpoint.every=10 --set cluster.heartbeat_ms=200",
        180);
    ASSERT_EQ(trained.exit_code, 0) << trained.output;
    const auto exported =
        RunSwitchyard("ckpt export 20 --run-dir " + run + " --out " + out);
    ASSERT_EQ(exported.exit_code, 0) << exported.output;
    ASSERT_TRUE(std::filesystem::exists(out + "/config.json"));

    const std::string eval = "train --reference --eval-text " + dir_ +
                             "/held_out.txt" + flags +
                             " --set checkpoint.init_from=";
    const auto switchyard = RunSwitchyard(eval + out);
    ASSERT_EQ(switchyard.exit_code, 0) << switchyard.output;
    const double want = NumberAfter(switchyard.output, "text loss");
    ASSERT_TRUE(std::isfinite(want)) << switchyard.output;

    const auto torch = RunPython(std::string(SWITCHYARD_SOURCE_DIR) +
                                 "/tests/python/export_loss.py " + out + " " +
                                 dir_ + "/held_out.txt --batch 4");
    ASSERT_EQ(torch.exit_code, 0) << torch.output;
    const double got = NumberAfter(torch.output, "\"loss\":");
    EXPECT_NEAR(got, want, 1e-4 * want) << torch.output << switchyard.output;
    std::cout << v.name << ": Switchyard " << want << ", PyTorch " << got
              << ", relative difference " << std::fabs(got - want) / want
              << std::endl;
    EXPECT_NE(torch.output.find("\"windows\": "), std::string::npos);

    // The round trip: PyTorch's state_dict, saved, imported.
    const std::string saved = run + "-torch.safetensors";
    const auto save = RunPython(
        "-c 'import sys; from switchyard.torch import load_export, save_file; "
        "save_file(load_export(sys.argv[1]).state_dict(), sys.argv[2])' " +
        out + " " + saved);
    ASSERT_EQ(save.exit_code, 0) << save.output;
    const auto imported = RunSwitchyard("ckpt import " + saved + flags);
    ASSERT_EQ(imported.exit_code, 0) << imported.output;
    const std::string dense = std::to_string(v.dense_tensors);
    EXPECT_NE(imported.output.find("dense tensors: " + dense + " of " + dense +
                                   " from the files"),
              std::string::npos)
        << imported.output;
    for (const char* layer : {"layers.1: ", "layers.3: "}) {
      EXPECT_NE(imported.output.find(std::string(layer) +
                                     "8 of 8 experts from their own tensors"),
                std::string::npos)
          << imported.output;
    }
    const auto again = RunSwitchyard(eval + saved);
    ASSERT_EQ(again.exit_code, 0) << again.output;
    EXPECT_EQ(again.output, switchyard.output);
  }
}

// A cluster of `switchyard up --trainers 0` in the background, whose
// trainers are PyTorch processes (switchyard.torch over the binding).
class PyTorchClusterTest : public PyTorchTest {
 protected:
  void SetUp() override {
    if (!SWITCHYARD_PYTHON_BINDING) {
      GTEST_SKIP() << "no switchyard._core in this build (sanitizer builds "
                      "leave the binding out: python/CMakeLists.txt)";
    }
    PyTorchTest::SetUp();
    // One MoE layer (layer 1) of 4 experts, top-2; the cluster's dense
    // shards are unused. AdamW at a constant rate, so that one step can be
    // compared with torch.optim.AdamW.
    std::ofstream yaml(dir_ + "/moe.yaml");
    yaml << "cluster:\n  workers: 2\n  trainers: 1\n  heartbeat_ms: 200\n"
            "  lease_ms: 1000\n  call_timeout_ms: 2000\n"
            "model:\n  num_layers: 2\n  d_model: 32\n  d_ff: 64\n"
            "  num_heads: 2\n  seq_len: 16\n  moe_every: 2\n"
            "  num_experts: 4\n  top_k: 2\n"
            "training:\n  steps: 5\n  optimizer: adamw\n"
            "  lr_schedule: constant\n  warmup_steps: 0\n"
            "  learning_rate: 0.01\n  weight_decay: 0\n  threads: 1\n"
            // A first AdamW step is about lr * sign(g) with a small eps:
            // eps 1 makes the compared update depend on the gradient's
            // scale too.
            "  eps: 1\n"
            "checkpoint:\n  every: 1\n";
  }
  void TearDown() override {
    testing::StopAndReap(up_);
    if (!IsSkipped()) PyTorchTest::TearDown();
  }

  std::string Config() const { return dir_ + "/moe.yaml"; }

  // Starts `up` on run directory `run` with `config` (default: Config())
  // and waits until its workers serve.
  void StartCluster(const std::string& run,
                    const std::vector<std::string>& sets,
                    const std::string& config = "") {
    std::vector<std::string> args = {
        SWITCHYARD_BINARY, "up",
        "--workers",       "2",
        "--trainers",      "0",
        "--max-restarts",  max_restarts_,
        "--run-dir",       run,
        "--config",        config.empty() ? Config() : config};
    for (const auto& set : sets) {
      args.push_back("--set");
      args.push_back(set);
    }
    log_ = run + ".log";
    up_ = testing::Spawn(args, log_);
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(90);
    while (testing::ReadFile(log_).find("[up] cluster ready") ==
           std::string::npos) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline)
          << testing::ReadFile(log_);
      ASSERT_EQ(::waitpid(up_, nullptr, WNOHANG), 0) << testing::ReadFile(log_);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

  // Stops `up`; its whole output.
  std::string StopCluster() {
    testing::StopAndReap(up_);
    up_ = -1;
    return testing::ReadFile(log_);
  }

  pid_t up_ = -1;
  std::string log_;
  std::string max_restarts_ = "0";  // `up --max-restarts`.
};

// switchyard.torch.MoE with its experts on the cluster against a plain
// PyTorch MoE holding the same weights (fp32): outputs, input gradients and
// the router's gradient within 1e-5 relative; after one step, the experts
// the cluster updated (checkpoint 1, exported) equal torch.optim.AdamW's
// update of the plain ones within 1e-5.
TEST_F(PyTorchClusterTest, GradientsAndUpdatesMatchPlainPyTorch) {
  const std::string weights = dir_ + "/weights.safetensors";
  const std::string updated = dir_ + "/updated.safetensors";
  const std::string run = dir_ + "/grad";
  const auto wrote = RunPython(Script("moe_test.py") + " write-weights " +
                               Config() + " " + weights);
  ASSERT_EQ(wrote.exit_code, 0) << wrote.output;
  StartCluster(run, {"checkpoint.init_from=" + weights});
  const auto check =
      RunPython(Script("moe_test.py") + " gradcheck " + run + " " + Config() +
                " " + weights + " --updated " + updated);
  ASSERT_EQ(check.exit_code, 0) << check.output << testing::ReadFile(log_);
  EXPECT_NE(check.output.find("moe_test gradcheck ok"), std::string::npos)
      << check.output;
  // Bad calls (an unknown expert, layer or micro-batch, wrong sizes) were
  // refused with errors naming them.
  EXPECT_NE(check.output.find("refusals ok"), std::string::npos)
      << check.output;
  // A session whose model differs from the cluster's was refused.
  EXPECT_NE(check.output.find("configuration mismatch refused"),
            std::string::npos)
      << check.output;
  // Checkpoint 1 holds the experts after the step.
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (RunSwitchyard("ckpt ls --run-dir " + run).output.find("\n1 ") ==
         std::string::npos) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline)
        << testing::ReadFile(log_);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  const std::string out = dir_ + "/grad-export";
  const auto exported =
      RunSwitchyard("ckpt export 1 --run-dir " + run + " --out " + out);
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  const auto compared = RunPython(
      "-c 'import sys, torch\n"
      "from switchyard.torch import read_safetensors\n"
      "got = read_safetensors(sys.argv[1])\n"
      "want = read_safetensors(sys.argv[2])\n"
      "assert set(want) <= set(got), sorted(set(want) - set(got))\n"
      "worst = max(((got[n] - want[n]).abs().max() / want[n].abs().max())"
      ".item() for n in want)\n"
      "print(\"tensors\", len(want), \"worst relative difference\", worst)\n"
      "assert worst <= 1e-5, worst' " +
      out + "/experts-layer1.safetensors " + updated);
  EXPECT_EQ(compared.exit_code, 0) << compared.output;
  std::cout << compared.output;
}

// Two PyTorch trainer processes (torch.distributed over gloo) and two
// workers, 200 steps, twice: the experts' parameters and optimizer state at
// the end (the digests the workers log) are the same bit for bit. In the
// second run a third worker joins after step 10 and worker-0 is drained
// after step 30: the sessions pause at a step boundary for each move and
// go on, nothing redone, and the end is still the same bit for bit. (A
// step takes 20-40 ms here: the run is long enough that the drain lands
// while the sessions train, however slowly the joiner and the drain
// command start; with 60 steps a CI run once drained after the end.)
TEST_F(PyTorchClusterTest, TwoDataParallelTrainersAreBitIdenticalAcrossRuns) {
  std::map<std::string, std::string> first;
  for (const std::string name : {"run1", "run2"}) {
    SCOPED_TRACE(name);
    const std::string run = dir_ + "/" + name;
    const std::vector<std::string> sets = {"cluster.trainers=2",
                                           "training.steps=200"};
    StartCluster(run, sets);
    pid_t ranks[2];
    for (int r = 0; r < 2; ++r) {
      std::vector<std::string> args = PythonCommand();
      for (const std::string& a :
           {Script("moe_test.py"), std::string("determinism"), run, Config(),
            std::to_string(r), std::string("2"),
            run + "-rank" + std::to_string(r) + ".json", std::string("--steps"),
            std::string("200")}) {
        args.push_back(a);
      }
      ranks[r] =
          testing::Spawn(args, run + "-rank" + std::to_string(r) + ".log");
    }
    const std::string rank0 = run + "-rank0.log";
    const std::string joiner_log = run + "-worker-2.log";
    pid_t joiner = -1;
    auto wait_for_step = [&](int step) {
      const std::string line = "step " + std::to_string(step) + " loss";
      const auto deadline =
          std::chrono::steady_clock::now() + std::chrono::seconds(60);
      while (testing::ReadFile(rank0).find(line) == std::string::npos &&
             std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    };
    if (name == "run2") {
      wait_for_step(10);
      std::string address;
      std::ifstream(run + "/coordinator.addr") >> address;
      std::vector<std::string> args = {
          SWITCHYARD_BINARY,
          "worker",
          "--name",
          "worker-2",
          "--config",
          Config(),
          "--drain-on-stop=false",
          "--set",
          "cluster.state_dir=" + run,
          "--set",
          "cluster.secret_file=" + run + "/secret",
          "--set",
          "cluster.coordinator_address=" + address};
      for (const auto& set : sets) {
        args.push_back("--set");
        args.push_back(set);
      }
      joiner = testing::Spawn(args, joiner_log);
      wait_for_step(30);
      const auto drain = RunSwitchyard(
          "drain worker-0 --run-dir " + run + " --config " + Config(), 60);
      EXPECT_EQ(drain.exit_code, 0) << drain.output;
    }
    for (int r = 0; r < 2; ++r) {
      const int code = testing::WaitExit(ranks[r], std::chrono::seconds(120));
      EXPECT_EQ(code, 0) << testing::ReadFile(run + "-rank" +
                                              std::to_string(r) + ".log");
      if (code == -1) testing::StopAndReap(ranks[r]);  // Still running.
    }
    // The workers log the digests once they have applied the last step.
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(30);
    auto logs = [&] {
      return testing::ReadFile(log_) + testing::ReadFile(joiner_log);
    };
    while (testing::Digests(logs()).size() < 4) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << logs();
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    // Before the joiner is stopped (its leaving then is a rollback).
    const std::string trained = logs();
    if (joiner > 0) testing::StopAndReap(joiner);
    const std::string output = StopCluster() + testing::ReadFile(joiner_log);
    auto digests = testing::Digests(output);
    // The 4 experts of the one MoE layer (and the unused dense shards).
    ASSERT_GE(digests.size(), 4u) << output;
    if (first.empty()) {
      first = digests;
    } else {
      EXPECT_EQ(digests, first) << output;
      // Both moves were live: the sessions paused and went on.
      const std::string trainers =
          testing::ReadFile(rank0) + testing::ReadFile(run + "-rank1.log");
      static const std::regex kContinued(
          R"(trainer [01]: epoch \d+ continues at step \d+ after \d+ ms)");
      EXPECT_EQ(std::distance(std::sregex_iterator(trainers.begin(),
                                                   trainers.end(), kContinued),
                              std::sregex_iterator()),
                4)
          << trainers << output;
      EXPECT_NE(output.find("worker-2: took over"), std::string::npos)
          << output;
      EXPECT_EQ(trained.find("(the newest committed checkpoint)"),
                std::string::npos)
          << trained;
    }
  }
}

// A worker killed while a PyTorch trainer trains: the trainer gets a
// SwitchyardError naming it, within the configured deadlines (no hang);
// then, as docs/pytorch.md says, it connects again once the cluster has
// recovered (re-placed the lost shards on the other worker) and trains on.
TEST_F(PyTorchClusterTest, AKilledWorkerIsAnExceptionNamingIt) {
  const std::string run = dir_ + "/kill";
  max_restarts_ = "3";  // `up` restarts the killed worker.
  StartCluster(run, {"training.steps=100000", "checkpoint.every=0"});
  std::vector<std::string> args = PythonCommand();
  args.push_back(Script("moe_test.py"));
  args.push_back("killed");
  args.push_back(run);
  args.push_back(Config());
  const std::string trainer_log = run + "-trainer.log";
  const pid_t trainer = testing::Spawn(args, trainer_log);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (testing::ReadFile(trainer_log).find("step 3") == std::string::npos) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline)
        << testing::ReadFile(trainer_log) << testing::ReadFile(log_);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  // worker-1's pid, from `switchyard status`.
  const auto status = RunSwitchyard("status --run-dir " + run);
  // Its line: name, state, address, pid, ...
  const std::regex pid_of("\nworker-1 +\\S+ +\\S+ +([0-9]+)");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(status.output, m, pid_of)) << status.output;
  const auto killed_at = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(std::stoi(m[1]), SIGKILL), 0);
  // call_timeout_ms is 2 s, the lease 1 s: well within 30 s, reconnection
  // included.
  const int code = testing::WaitExit(trainer, std::chrono::seconds(30));
  EXPECT_EQ(code, 0) << testing::ReadFile(trainer_log);
  const double seconds = std::chrono::duration<double>(
                             std::chrono::steady_clock::now() - killed_at)
                             .count();
  if (code == -1) testing::StopAndReap(trainer);  // Still running.
  const std::string out = testing::ReadFile(trainer_log);
  const size_t error = out.find("error: ");
  ASSERT_NE(error, std::string::npos) << out;
  const std::string line = out.substr(error, out.find('\n', error) - error);
  EXPECT_NE(line.find("worker-1"), std::string::npos) << out;
  std::cout << "exception, reconnection and 3 steps " << seconds
            << " s after the kill: " << line << std::endl;
  EXPECT_NE(out.find("reconnected at step"), std::string::npos) << out;
  EXPECT_NE(out.find("moe_test killed ok"), std::string::npos) << out;
}

// examples/torch_moe.py (docs/pytorch.md) trains the demo model's MoE
// shape from PyTorch against `up --trainers 0`: the loss falls from ln 256.
TEST_F(PyTorchClusterTest, TheExampleTrains) {
  const std::string run = dir_ + "/example";
  const std::string config =
      std::string(SWITCHYARD_SOURCE_DIR) + "/examples/demo.yaml";
  StartCluster(run, {"cluster.trainers=1"}, config);
  const auto trained = RunPython(
      std::string(SWITCHYARD_SOURCE_DIR) + "/examples/torch_moe.py --run-dir " +
      run + " --config " + config + " --set cluster.trainers=1 --data " + dir_ +
      "/data --steps 30 --log-every 10");
  ASSERT_EQ(trained.exit_code, 0) << trained.output << testing::ReadFile(log_);
  const double loss = NumberAfter(trained.output, "done: loss");
  EXPECT_LT(loss, 4.0) << trained.output;  // ln 256 = 5.55 at the start.
  EXPECT_NE(trained.output.find("step 30/30 loss"), std::string::npos)
      << trained.output;
}

}  // namespace
}  // namespace switchyard
