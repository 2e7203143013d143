// Switchyard and PyTorch (python/switchyard, Debian's python3-torch): an
// export loads into PyTorch by itself from its config.json and computes the
// loss Switchyard computes on the same text; a file saved from that PyTorch
// module (its state_dict) imports back into Switchyard unchanged.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <regex>
#include <string>

#include "tests/testing/files.h"
#include "tests/testing/run_command.h"

namespace switchyard {
namespace {

using testing::CommandResult;
using testing::RunSwitchyard;

// Debian's interpreter with python3-torch, the package on its path.
CommandResult RunPython(const std::string& args, int timeout_s = 300) {
  return testing::RunCommand(std::string("env PYTHONDONTWRITEBYTECODE=1 "
                                         "PYTHONPATH=") +
                                 SWITCHYARD_SOURCE_DIR + "/python " +
                                 SWITCHYARD_PYTHON + " " + args,
                             timeout_s);
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
  const std::string base =
      " --config " + std::string(SWITCHYARD_SOURCE_DIR) +
      "/examples/tiny.yaml --data " + dir_ +
      "/data --set training.steps=20 --set training.threads=1"
      " --set training.batch_size=4";
  const Variant variants[] = {
      // Top-2 with capacity in training, a larger one at evaluation.
      {"top2_capacity",
       " --set model.top_k=2 --set model.capacity_factor=1.0"
       " --set training.eval_capacity_factor=1.5",
       38},
      // SwiGLU without biases, LayerNorm, rotary positions, experts in two
      // shards each (joined by the export).
      {"swiglu_rotary",
       " --set model.activation=swiglu --set model.norm=layernorm"
       " --set model.positions=rotary --set model.expert_bias=false"
       " --set model.shards_per_expert=2",
       42}};
  for (const Variant& v : variants) {
    SCOPED_TRACE(v.name);
    const std::string run = dir_ + "/" + v.name, out = run + "-export";
    const std::string flags = base + v.flags;
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

}  // namespace
}  // namespace switchyard
