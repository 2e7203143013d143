// The switchyard command's help, usage errors and configuration errors.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "storage/safetensors.h"
#include "tests/testing/run_command.h"

namespace {

using Result = switchyard::testing::CommandResult;
using switchyard::testing::RunSwitchyard;

TEST(CliTest, HelpForEveryCommand) {
  Result top = RunSwitchyard("--help");
  EXPECT_EQ(top.exit_code, 0);
  for (const char* command :
       {"coordinator", "worker", "train", "up", "status"}) {
    EXPECT_NE(top.output.find(command), std::string::npos) << command;
    Result help = RunSwitchyard(std::string(command) + " --help");
    EXPECT_EQ(help.exit_code, 0) << command;
    EXPECT_NE(help.output.find("usage: switchyard " + std::string(command)),
              std::string::npos)
        << help.output;
    EXPECT_NE(help.output.find("--config"), std::string::npos) << command;
  }
  EXPECT_NE(RunSwitchyard("up --help").output.find("--workers VALUE"),
            std::string::npos);
  EXPECT_NE(RunSwitchyard("status --help").output.find("--json"),
            std::string::npos);
}

TEST(CliTest, UsageErrorsExitWithTwo) {
  Result unknown = RunSwitchyard("frobnicate");
  EXPECT_EQ(unknown.exit_code, 2);
  EXPECT_NE(unknown.output.find("unknown command 'frobnicate'"),
            std::string::npos);
  Result flag = RunSwitchyard("status --no-such-flag");
  EXPECT_EQ(flag.exit_code, 2);
  EXPECT_NE(flag.output.find("unknown flag --no-such-flag"), std::string::npos);
  Result config = RunSwitchyard("coordinator --set model.top_k=99");
  EXPECT_EQ(config.exit_code, 2);
  EXPECT_NE(config.output.find("model.top_k (99) must be in [1, "
                               "model.num_experts (8)]"),
            std::string::npos)
      << config.output;
  Result secret = RunSwitchyard("coordinator");
  EXPECT_EQ(secret.exit_code, 2);
  EXPECT_NE(secret.output.find("no secret file"), std::string::npos)
      << secret.output;
  // Per-member flags of `up` name members of the cluster it starts.
  for (const char* bad :
       {"--member-set worker-5:training.steps=3", "--member-set worker-0",
        "--netns trainer-1=ns", "--netns worker-0"}) {
    Result up =
        RunSwitchyard(std::string("up --workers 2 --trainers 1 ") + bad);
    EXPECT_EQ(up.exit_code, 2) << bad << "\n" << up.output;
    EXPECT_NE(up.output.find("of this cluster"), std::string::npos)
        << up.output;
  }
}

TEST(CliTest, StatusWithoutACoordinatorFailsFast) {
  const std::string dir = ::testing::TempDir();
  const std::string secret = dir + "/cli_test_secret";
  FILE* f = std::fopen(secret.c_str(), "w");
  std::fputs("0123456789abcdef0123456789abcdef\n", f);
  std::fclose(f);
  // Port 1 on loopback: nothing listens there.
  Result r = RunSwitchyard("status --coordinator 127.0.0.1:1 --secret-file " +
                           secret + " --timeout-ms 500");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("DEADLINE_EXCEEDED"), std::string::npos) << r.output;
}

// A model the workers cannot hold fails `up` before anything starts (before:
// "cluster ready", workers allocating what fitted, the error 60 s later).
TEST(CliTest, UpRefusesAModelItsWorkersCannotHold) {
  const std::string dir = ::testing::TempDir() + "/cli_test_unplaceable";
  Result r = RunSwitchyard("up --workers 2 --trainers 0 --run-dir " + dir +
                           " --config " + std::string(SWITCHYARD_SOURCE_DIR) +
                           "/examples/tiny.yaml"
                           " --set cluster.worker_capacity_bytes=1000000");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("cannot place 16 of 18 shards"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("cluster.worker_capacity_bytes 1000000"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("cluster ready"), std::string::npos) << r.output;
}

// Sizes past Switchyard's limits, which used to end a process in an
// uncaught std::bad_alloc (or a tensor error naming no field), and the NCCL
// backend, which silently ran UCX, are configuration errors: exit 2.
TEST(CliTest, ConfigPastTheLimitsExitsWithTwo) {
  for (const char* set :
       {"training.batch_size=2000000000", "model.num_experts=2000000000",
        "model.d_model=2147483644"}) {
    Result r =
        RunSwitchyard("ckpt import /nonexistent --set " + std::string(set));
    EXPECT_EQ(r.exit_code, 2) << set << ": " << r.output;
    EXPECT_NE(r.output.find("--set " + std::string(set) + ": "),
              std::string::npos)
        << r.output;
    EXPECT_NE(r.output.find("(Switchyard's limit for this field)"),
              std::string::npos)
        << r.output;
  }
  Result nccl =
      RunSwitchyard("ckpt import /nonexistent --set transport.backend=nccl");
  EXPECT_EQ(nccl.exit_code, 2) << nccl.output;
  EXPECT_NE(nccl.output.find("the NCCL data plane is not built yet; use ucx"),
            std::string::npos)
      << nccl.output;
}

// `ckpt import` reads regular files: a device, a FIFO, a directory where a
// file is expected give an error and exit 1 (it used to abort on
// /dev/urandom in an uncaught filesystem_error, and would block on a FIFO).
TEST(CliTest, CkptImportReadsRegularFilesOnly) {
  const std::string dir =
      ::testing::TempDir() + "/cli_import_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir + "/export/dense.safetensors");
  std::FILE* index =
      std::fopen((dir + "/export/model.safetensors.index.json").c_str(), "w");
  std::fputs("{\"weight_map\":{\"lm_head\":\"dense.safetensors\"}}", index);
  std::fclose(index);
  const std::string fifo = dir + "/fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const std::pair<std::string, std::string> cases[] = {
      {"/dev/urandom", "is a character device, not a regular file"},
      {"/dev/zero", "is a character device, not a regular file"},
      {fifo, "is a FIFO, not a regular file"},
      {dir + "/export",
       "dense.safetensors' is a directory, not a regular "
       "file"},
      {dir, "is a directory without a readable safetensors index"}};
  for (const auto& [path, expected] : cases) {
    Result r = RunSwitchyard("ckpt import " + path, 30);
    EXPECT_EQ(r.exit_code, 1) << path << ": " << r.output;
    EXPECT_NE(r.output.find(expected), std::string::npos) << r.output;
  }
  std::filesystem::remove_all(dir);
}

// A tensor with the right number of values in the wrong shape (a
// transposed lm_head or router) is refused naming both shapes and the
// orientation; it used to load silently wrong.
TEST(CliTest, CkptImportRefusesTensorsOfAnotherShape) {
  const std::string path = ::testing::TempDir() + "/cli_import_shape_" +
                           std::to_string(::getpid()) + ".safetensors";
  using switchyard::DType;
  using switchyard::Tensor;
  // The default model: d_model 64, vocab 256, 8 experts, layer 1 MoE.
  const std::pair<std::string, std::vector<int64_t>> cases[] = {
      {"lm_head", {256, 64}},
      {"layers.1.router", {8, 64}},
      {"layers.1.experts.0.w2", {64, 256}},
      {"layers.0.ffn.b1", {256, 1}}};
  const std::string expected[] = {"(256, 64); the model expects (64, 256)",
                                  "(8, 64); the model expects (64, 8)",
                                  "(64, 256); the model expects (256, 64)",
                                  "(256, 1); the model expects (256,)"};
  for (size_t i = 0; i < std::size(cases); ++i) {
    const auto& [name, shape] = cases[i];
    std::vector<switchyard::storage::NamedArray> tensors = {
        {name, Tensor::Zeros(DType::kF32, shape).value()}};
    if (name.find("experts") != std::string::npos) {
      tensors.push_back({"layers.1.experts.0.w1",
                         Tensor::Zeros(DType::kF32, {64, 256}).value()});
    }
    ASSERT_TRUE(switchyard::storage::WriteSafetensors(path, tensors, {}).ok());
    Result r = RunSwitchyard("ckpt import " + path, 30);
    EXPECT_EQ(r.exit_code, 1) << name << ": " << r.output;
    EXPECT_NE(
        r.output.find(path + ": tensor " + name + " has shape " + expected[i]),
        std::string::npos)
        << r.output;
    EXPECT_NE(r.output.find("Switchyard computes y = x @ W and stores W as "
                            "(in_features, out_features)"),
              std::string::npos)
        << r.output;
  }
  std::filesystem::remove(path);
}

}  // namespace
