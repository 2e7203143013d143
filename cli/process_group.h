// Child processes of `switchyard up`, with their output prefixed.
//
// A name may be spawned again once its child has exited (a restart): the
// queries by name answer for the newest child of that name. Children die
// with this process (PR_SET_PDEATHSIG), a SIGKILL of it included.
//
// Each child's stdout and stderr go to one pipe; a thread per child copies
// its lines to our stdout as "[name] line". Not thread-safe: one owner.
#ifndef SWITCHYARD_CLI_PROCESS_GROUP_H_
#define SWITCHYARD_CLI_PROCESS_GROUP_H_

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"

namespace switchyard::cli {

class ProcessGroup {
 public:
  ProcessGroup() = default;
  ~ProcessGroup();  // Kills (SIGKILL) children still running.
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  // Starts `argv` (argv[0] is the executable path) as child `name`.
  StatusOr<pid_t> Spawn(const std::string& name,
                        const std::vector<std::string>& argv);

  // Reaps children that exited; returns "name exited with ..." for each,
  // including those Terminate reaped since the last call.
  std::vector<std::string> ReapExited();
  bool IsRunning(const std::string& name) const;
  // True when child `name` has been reaped after exiting with status 0.
  bool ExitedCleanly(const std::string& name) const;
  // True when child `name` has been reaped after exiting with a non-zero
  // code (it refused to go on), not killed by a signal.
  bool ExitedWithError(const std::string& name) const;
  // True when child `name` has been reaped after being killed by a signal
  // (a crash, a kill -9, the OOM killer).
  bool KilledBySignal(const std::string& name) const;
  int num_running() const;
  // The newest children of each name reaped after exiting other than with
  // status 0 (a signal, a non-zero exit code, killed after Terminate's
  // grace): "name (pid N) exited with ..." each.
  std::vector<std::string> AbnormalExits() const;

  // SIGTERM to the named children (all when empty), then SIGKILL to those
  // still running after `grace`.
  void Terminate(const std::vector<std::string>& names,
                 std::chrono::milliseconds grace);

 private:
  struct Child {
    std::string name;
    pid_t pid = -1;
    bool running = false;
    int wait_status = -1;  // From waitpid, once reaped.
    std::thread reader;
  };
  // The newest child named `name`, or null.
  const Child* Latest(const std::string& name) const;
  // Reaps `child` when it has exited; its event, or empty.
  std::string Reap(Child& child);

  std::vector<std::unique_ptr<Child>> children_;
  // Events Terminate reaped, for the next ReapExited.
  std::vector<std::string> unreported_;
};

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_PROCESS_GROUP_H_
