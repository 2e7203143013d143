#include "cli/process_group.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common/mutex.h"

namespace switchyard::cli {
namespace {

// Serializes the children's lines on stdout, so that lines never interleave.
// NOTE: what it guards is stdout, which the annotations cannot name.
Mutex output_mu;

void CopyLines(int fd, const std::string& name) {
  FILE* in = ::fdopen(fd, "r");
  if (in == nullptr) {
    ::close(fd);
    return;
  }
  char* line = nullptr;
  size_t capacity = 0;
  ssize_t n;
  while ((n = ::getline(&line, &capacity, in)) > 0) {
    MutexLock lock(&output_mu);
    std::fprintf(stdout, "[%s] %.*s", name.c_str(), static_cast<int>(n), line);
    if (line[n - 1] != '\n') std::fputc('\n', stdout);
    std::fflush(stdout);
  }
  std::free(line);
  std::fclose(in);
}

std::string DescribeExit(int status) {
  if (WIFEXITED(status))
    return "exit code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return std::string("signal ") + std::to_string(WTERMSIG(status)) + " (" +
           ::strsignal(WTERMSIG(status)) + ")";
  }
  return "status " + std::to_string(status);
}

}  // namespace

ProcessGroup::~ProcessGroup() {
  for (auto& child : children_) {
    if (child->running) {
      ::kill(child->pid, SIGKILL);
      ::waitpid(child->pid, nullptr, 0);
      child->running = false;
    }
    if (child->reader.joinable()) child->reader.join();
  }
}

StatusOr<pid_t> ProcessGroup::Spawn(const std::string& name,
                                    const std::vector<std::string>& argv) {
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) {
    return UnavailableError(std::string("pipe: ") + std::strerror(errno));
  }
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
    return UnavailableError(std::string("fork: ") + std::strerror(errno));
  }
  if (pid == 0) {
    // Child: it dies with its parent (a SIGKILLed `up` leaves nothing
    // behind: no worker holding its store's lock or its port), even when
    // the parent died before this line.
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) {
      ::_exit(127);
    }
    // Unblock signals the parent blocked, route output to the pipe.
    sigset_t all;
    sigfillset(&all);
    ::sigprocmask(SIG_UNBLOCK, &all, nullptr);
    ::dup2(pipe_fds[1], STDOUT_FILENO);
    ::dup2(pipe_fds[1], STDERR_FILENO);
    ::execv(args[0], args.data());
    std::fprintf(stderr, "exec %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(pipe_fds[1]);
  auto child = std::make_unique<Child>();
  child->name = name;
  child->pid = pid;
  child->running = true;
  child->reader = std::thread(CopyLines, pipe_fds[0], name);
  children_.push_back(std::move(child));
  return pid;
}

std::string ProcessGroup::Reap(Child& child) {
  if (!child.running) return "";
  int status = 0;
  if (::waitpid(child.pid, &status, WNOHANG) != child.pid) return "";
  child.running = false;
  child.wait_status = status;
  return child.name + " (pid " + std::to_string(child.pid) + ") exited with " +
         DescribeExit(status);
}

std::vector<std::string> ProcessGroup::ReapExited() {
  std::vector<std::string> events = std::move(unreported_);
  unreported_.clear();
  for (auto& child : children_) {
    std::string event = Reap(*child);
    if (!event.empty()) events.push_back(std::move(event));
  }
  return events;
}

std::vector<std::string> ProcessGroup::AbnormalExits() const {
  std::vector<std::string> abnormal;
  for (const auto& child : children_) {
    // A child that was restarted is reported when it exits (ReapExited),
    // not here: its successor's exit is what counts.
    if (child->running || child->wait_status == -1 ||
        Latest(child->name) != child.get()) {
      continue;
    }
    if (WIFEXITED(child->wait_status) && WEXITSTATUS(child->wait_status) == 0) {
      continue;
    }
    abnormal.push_back(child->name + " (pid " + std::to_string(child->pid) +
                       ") exited with " + DescribeExit(child->wait_status));
  }
  return abnormal;
}

const ProcessGroup::Child* ProcessGroup::Latest(const std::string& name) const {
  for (auto it = children_.rbegin(); it != children_.rend(); ++it) {
    if ((*it)->name == name) return it->get();
  }
  return nullptr;
}

bool ProcessGroup::IsRunning(const std::string& name) const {
  const Child* child = Latest(name);
  return child != nullptr && child->running;
}

bool ProcessGroup::ExitedCleanly(const std::string& name) const {
  const Child* child = Latest(name);
  return child != nullptr && !child->running && child->wait_status != -1 &&
         WIFEXITED(child->wait_status) && WEXITSTATUS(child->wait_status) == 0;
}

bool ProcessGroup::ExitedWithError(const std::string& name) const {
  const Child* child = Latest(name);
  return child != nullptr && !child->running && child->wait_status != -1 &&
         WIFEXITED(child->wait_status) && WEXITSTATUS(child->wait_status) != 0;
}

bool ProcessGroup::KilledBySignal(const std::string& name) const {
  const Child* child = Latest(name);
  return child != nullptr && !child->running && child->wait_status != -1 &&
         WIFSIGNALED(child->wait_status);
}

int ProcessGroup::num_running() const {
  int n = 0;
  for (const auto& child : children_) n += child->running;
  return n;
}

void ProcessGroup::Terminate(const std::vector<std::string>& names,
                             std::chrono::milliseconds grace) {
  auto selected = [&](const Child& c) {
    if (names.empty()) return true;
    for (const auto& n : names) {
      if (n == c.name) return true;
    }
    return false;
  };
  for (auto& child : children_) {
    if (child->running && selected(*child)) ::kill(child->pid, SIGTERM);
  }
  const auto deadline = std::chrono::steady_clock::now() + grace;
  while (std::chrono::steady_clock::now() < deadline) {
    for (auto& child : children_) {
      std::string event = Reap(*child);
      if (!event.empty()) unreported_.push_back(std::move(event));
    }
    bool any = false;
    for (auto& child : children_) any |= child->running && selected(*child);
    if (!any) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (auto& child : children_) {
    if (child->running && selected(*child)) {
      std::fprintf(stderr, "[up] %s did not stop within %lld ms; killing it\n",
                   child->name.c_str(), static_cast<long long>(grace.count()));
      ::kill(child->pid, SIGKILL);
      int status = 0;
      ::waitpid(child->pid, &status, 0);
      child->running = false;
      child->wait_status = status;
      unreported_.push_back(child->name + " (pid " +
                            std::to_string(child->pid) + ") exited with " +
                            DescribeExit(status));
    }
  }
}

}  // namespace switchyard::cli
