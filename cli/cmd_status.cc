// switchyard status: print the cluster as the coordinator sees it.
#include <fstream>
#include <iostream>

#include "cli/commands.h"
#include "cli/config_flags.h"
#include "cli/status_client.h"
#include "transport/control/auth.h"

namespace switchyard::cli {

int StatusCommand(int argc, char** argv) {
  FlagParser parser(
      "switchyard status [--run-dir DIR | --config FILE] [flags]",
      "Prints workers (state, pid, shards held, bytes), trainers, the epoch\n"
      "and a placement summary. --run-dir reads the coordinator address and\n"
      "secret that `switchyard up` wrote there.");
  ConfigFlags flags;
  flags.Register(&parser);
  std::string run_dir;
  bool json = false;
  bool routing = false;
  int64_t timeout_ms = 5000;
  parser.AddString("run-dir", &run_dir,
                   "directory of a `switchyard up` cluster");
  parser.AddBool("json", &json, "print JSON instead of tables");
  parser.AddBool("routing", &routing,
                 "with --json, include every shard's route");
  parser.AddInt("timeout-ms", &timeout_ms, "deadline for the whole query");
  if (int rc = ParseOrExit(&parser, argc, argv); rc >= 0) return rc;

  if (!run_dir.empty()) {
    if (flags.coordinator.empty()) {
      std::ifstream in(run_dir + "/coordinator.addr");
      if (!(in >> flags.coordinator)) {
        std::cerr << "switchyard: no coordinator address in " << run_dir
                  << "/coordinator.addr (is the cluster up?)\n";
        return 1;
      }
    }
    if (flags.secret_file.empty()) flags.secret_file = run_dir + "/secret";
  }
  auto loaded = flags.Load();
  if (!loaded.ok()) {
    std::cerr << "switchyard: " << loaded.status().message() << "\n";
    return 2;
  }
  const auto& cluster = loaded->config.cluster();
  auto secret = control::ReadSecretFile(cluster.secret_file());
  if (!secret.ok()) {
    std::cerr << "switchyard: " << secret.status().message() << "\n";
    return 2;
  }
  auto address = ParseHostPort(cluster.coordinator_address());
  if (!address.ok()) {
    std::cerr << "switchyard: " << address.status().message() << "\n";
    return 2;
  }
  auto status =
      FetchStatus(*address, *secret, std::chrono::milliseconds(timeout_ms));
  if (!status.ok()) {
    std::cerr << "switchyard: status from " << address->ToString() << ": "
              << status.status().ToString() << "\n";
    return 1;
  }
  std::cout << (json ? StatusJson(*status, routing) : FormatStatus(*status));
  return 0;
}

}  // namespace switchyard::cli
