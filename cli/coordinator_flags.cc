#include "cli/coordinator_flags.h"

#include <fstream>
#include <iostream>

#include "transport/control/auth.h"

namespace switchyard::cli {

void CoordinatorFlags::Register(FlagParser* parser) {
  config.Register(parser);
  parser->AddString("run-dir", &run_dir,
                    "directory of a `switchyard up` cluster");
  parser->AddInt("timeout-ms", &timeout_ms, "deadline of each request");
}

int CoordinatorFlags::Resolve(HostPort* address, std::string* secret) {
  if (!run_dir.empty()) {
    if (config.coordinator.empty()) {
      std::ifstream in(run_dir + "/coordinator.addr");
      if (!(in >> config.coordinator)) {
        std::cerr << "switchyard: no coordinator address in " << run_dir
                  << "/coordinator.addr (is the cluster up?)\n";
        return 1;
      }
    }
    if (config.secret_file.empty()) config.secret_file = run_dir + "/secret";
  }
  auto loaded = config.Load();
  if (!loaded.ok()) {
    std::cerr << "switchyard: " << loaded.status().message() << "\n";
    return 2;
  }
  const auto& cluster = loaded->config.cluster();
  auto read = control::ReadSecretFile(cluster.secret_file());
  if (!read.ok()) {
    std::cerr << "switchyard: " << read.status().message() << "\n";
    return 2;
  }
  auto parsed = ParseHostPort(cluster.coordinator_address());
  if (!parsed.ok()) {
    std::cerr << "switchyard: " << parsed.status().message() << "\n";
    return 2;
  }
  *secret = *read;
  *address = *parsed;
  return 0;
}

}  // namespace switchyard::cli
