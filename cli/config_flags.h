// Flags shared by every subcommand that reads the run configuration.
#ifndef SWITCHYARD_CLI_CONFIG_FLAGS_H_
#define SWITCHYARD_CLI_CONFIG_FLAGS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/flags.h"
#include "transport/http/metrics_server.h"

namespace switchyard::cli {

struct ConfigFlags {
  std::string config_path;
  std::vector<std::string> overrides;
  std::string coordinator;
  std::string secret_file;
  std::string state_dir;
  std::string data_path;

  // Registers --config, --set, --coordinator, --secret-file, --state-dir,
  // --data.
  void Register(FlagParser* parser);
  // Loads the file and applies --set, then the shorthand flags.
  StatusOr<LoadedConfig> Load() const;
  // Every override, shorthand flags included, as "path=value" strings (for
  // passing on to child processes).
  std::vector<std::string> AllOverrides() const;
};

// Where training resumes: --fresh and --from-step (coordinator, up).
struct ResumeFlags {
  bool fresh = false;
  int64_t from_step = 0;

  void Register(FlagParser* parser);
  // The same flags as arguments for a child coordinator.
  std::vector<std::string> Args() const;
};

// --metrics-address HOST:PORT: a Prometheus endpoint for this process
// (coordinator, worker, train).
struct MetricsFlag {
  std::string address;

  void Register(FlagParser* parser);
  // Starts the endpoint when the flag was given (null otherwise).
  StatusOr<std::unique_ptr<transport::MetricsServer>> Start() const;
};

// Parses argv for a subcommand: prints help and returns 0 for --help, prints
// the error and returns 2 for bad flags, and returns -1 to go on.
int ParseOrExit(FlagParser* parser, int argc, char** argv,
                size_t max_positional = 0);

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_CONFIG_FLAGS_H_
