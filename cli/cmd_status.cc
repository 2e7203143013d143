// switchyard status: print the cluster as the coordinator sees it.
#include <iostream>

#include "cli/commands.h"
#include "cli/config_flags.h"
#include "cli/coordinator_flags.h"
#include "cli/status_client.h"

namespace switchyard::cli {

int StatusCommand(int argc, char** argv) {
  FlagParser parser(
      "switchyard status [--run-dir DIR | --config FILE] [flags]",
      "Prints workers (state, pid, shards held, bytes; DRAINING while a\n"
      "drain moves their shards), trainers, the epoch, a pending move and a\n"
      "placement summary. --run-dir reads the coordinator address and\n"
      "secret that `switchyard up` wrote there.");
  CoordinatorFlags where;
  where.Register(&parser);
  bool json = false;
  bool routing = false;
  parser.AddBool("json", &json, "print JSON instead of tables");
  parser.AddBool("routing", &routing,
                 "with --json, include every shard's route");
  if (int rc = ParseOrExit(&parser, argc, argv); rc >= 0) return rc;
  HostPort address;
  std::string secret;
  if (int rc = where.Resolve(&address, &secret); rc != 0) return rc;
  auto status = FetchStatus(address, secret, where.timeout());
  if (!status.ok()) {
    std::cerr << "switchyard: status from " << address.ToString() << ": "
              << status.status().ToString() << "\n";
    return 1;
  }
  std::cout << (json ? StatusJson(*status, routing) : FormatStatus(*status));
  return 0;
}

}  // namespace switchyard::cli
