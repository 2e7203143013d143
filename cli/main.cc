// The switchyard command: one binary, one subcommand per process role.
#include <cstring>
#include <filesystem>
#include <iostream>
#include <new>
#include <string>

#include "cli/commands.h"
#include "common/logging.h"
#include "expert_worker/cpu/blas_kernels.h"

namespace {

constexpr char kUsage[] =
    "usage: switchyard COMMAND [flags]    (switchyard COMMAND --help)\n"
    "\n"
    "Switchyard: a distributed expert server for training sparse\n"
    "Mixture-of-Experts models.\n"
    "\n"
    "commands:\n"
    "  coordinator   run the coordinator (membership, placement, routing)\n"
    "  worker        run an expert worker\n"
    "  train         run a trainer\n"
    "  up            start a local cluster as child processes\n"
    "  status        print the cluster's members, epoch and placement\n"
    "  drain         move a worker's shards to the others live, then stop it\n"
    "  ckpt          list, verify or export committed checkpoints\n";

}  // namespace

int main(int argc, char** argv) {
  switchyard::expert_worker::SelectBlasKernels(argv);
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 ||
      std::strcmp(argv[1], "-h") == 0 || std::strcmp(argv[1], "help") == 0) {
    std::cout << kUsage;
    return argc < 2 ? 2 : 0;
  }
  switchyard::InitLogging(argv[0]);
  const std::string command = argv[1];
  using namespace switchyard::cli;
  // The last resort for what inputs can still cause on this thread (sizes
  // from configuration and files are checked where they are read): an
  // error and exit 1, not an abort.
  try {
    if (command == "coordinator") return CoordinatorCommand(argc, argv);
    if (command == "worker") return WorkerCommand(argc, argv);
    if (command == "train") return TrainCommand(argc, argv);
    if (command == "up") return UpCommand(argc, argv);
    if (command == "status") return StatusCommand(argc, argv);
    if (command == "drain") return DrainCommand(argc, argv);
    if (command == "ckpt") return CkptCommand(argc, argv);
  } catch (const std::bad_alloc&) {
    std::cerr << "switchyard: out of memory\n";
    return 1;
  } catch (const std::filesystem::filesystem_error& e) {
    std::cerr << "switchyard: " << e.what() << "\n";
    return 1;
  }
  std::cerr << "switchyard: unknown command '" << command << "'\n\n" << kUsage;
  return 2;
}
