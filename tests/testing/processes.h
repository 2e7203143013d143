// Test helper: child processes with their output in a log file.
// Header-only.
#ifndef SWITCHYARD_TESTS_TESTING_PROCESSES_H_
#define SWITCHYARD_TESTS_TESTING_PROCESSES_H_

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

namespace switchyard::testing {

// Starts args[0] with `args`, stdout and stderr appended to `log`.
inline pid_t Spawn(const std::vector<std::string>& args,
                   const std::string& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    FILE* out = std::fopen(log.c_str(), "a");
    ::dup2(fileno(out), STDOUT_FILENO);
    ::dup2(fileno(out), STDERR_FILENO);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  return pid;
}

// SIGTERM, then SIGKILL after 10 s; reaps the child. Only for a child not
// yet reaped (WaitExit reaps one that exited): its pid may be reused.
inline void StopAndReap(pid_t pid) {
  if (pid <= 0) return;
  ::kill(pid, SIGTERM);
  for (int i = 0; i < 200; ++i) {
    if (::waitpid(pid, nullptr, WNOHANG) == pid) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
}

// Waits up to `timeout` for the child to exit; its exit code, or -1 on
// timeout (the child keeps running) or death by a signal.
inline int WaitExit(pid_t pid, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return -1;
}

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_TESTING_PROCESSES_H_
