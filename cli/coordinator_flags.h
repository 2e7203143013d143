// How a command that talks to a running cluster (status, drain) finds
// the coordinator: --run-dir of a `switchyard up` cluster, or the
// configuration's address and secret file.
#ifndef SWITCHYARD_CLI_COORDINATOR_FLAGS_H_
#define SWITCHYARD_CLI_COORDINATOR_FLAGS_H_

#include <chrono>
#include <cstdint>
#include <string>

#include "cli/config_flags.h"
#include "common/flags.h"
#include "common/net_address.h"

namespace switchyard::cli {

struct CoordinatorFlags {
  ConfigFlags config;
  std::string run_dir;
  int64_t timeout_ms = 5000;

  void Register(FlagParser* parser);
  // The address and secret; on failure prints why and returns the exit
  // code (1: no running cluster found, 2: bad flags or configuration).
  int Resolve(HostPort* address, std::string* secret);
  std::chrono::milliseconds timeout() const {
    return std::chrono::milliseconds(timeout_ms);
  }
};

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_COORDINATOR_FLAGS_H_
