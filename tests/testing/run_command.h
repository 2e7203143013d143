// Test helper: runs the switchyard binary through the shell, under
// coreutils' timeout so that a hang fails the test instead of stalling it.
// Header-only.
#ifndef SWITCHYARD_TESTS_TESTING_RUN_COMMAND_H_
#define SWITCHYARD_TESTS_TESTING_RUN_COMMAND_H_

#include <sys/wait.h>

#include <cstdio>
#include <map>
#include <regex>
#include <sstream>
#include <string>

namespace switchyard::testing {

struct CommandResult {
  int exit_code = -1;  // 124 when the timeout killed it.
  std::string output;  // stdout and stderr together.
};

// Runs `command` through the shell (stdout and stderr together).
inline CommandResult RunCommand(const std::string& command, int timeout_s) {
  const std::string line =
      "timeout " + std::to_string(timeout_s) + " " + command + " 2>&1";
  FILE* pipe = ::popen(line.c_str(), "r");
  CommandResult result;
  if (pipe == nullptr) return result;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) {
    result.output.append(buf, n);
  }
  const int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

inline CommandResult RunSwitchyard(const std::string& args,
                                   int timeout_s = 120) {
  return RunCommand(std::string(SWITCHYARD_BINARY) + " " + args, timeout_s);
}

// "<...> digest L0.E3.S0 0123456789abcdef" lines of a run's output (the
// reference prints them, workers log them at the run's end), by shard; the
// last line of a shard wins (a worker that applies the last step again
// after a rollback logs it again).
inline std::map<std::string, std::string> Digests(const std::string& output) {
  static const std::regex kLine(R"(digest ([A-Z0-9.]+) ([0-9a-f]{16}))");
  std::map<std::string, std::string> digests;
  std::istringstream in(output);
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (std::regex_search(line, m, kLine)) digests[m[1]] = m[2];
  }
  return digests;
}

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_TESTING_RUN_COMMAND_H_
