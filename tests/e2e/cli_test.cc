// The switchyard command's help, usage errors and configuration errors.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <string>

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

}  // namespace
