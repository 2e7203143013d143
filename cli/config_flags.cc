#include "cli/config_flags.h"

#include <filesystem>
#include <iostream>

namespace switchyard::cli {

void ConfigFlags::Register(FlagParser* parser) {
  parser->AddString("config", &config_path,
                    "YAML run configuration (docs/configuration.md)");
  parser->AddRepeated("set", &overrides,
                      "override a config field: section.field=value");
  parser->AddString("coordinator", &coordinator,
                    "coordinator host:port (sets cluster.coordinator_address)");
  parser->AddString("secret-file", &secret_file,
                    "shared-secret file (sets cluster.secret_file)");
  parser->AddString("state-dir", &state_dir,
                    "state directory (sets cluster.state_dir)");
  parser->AddString("data", &data_path,
                    "training text, a file or a directory (sets "
                    "training.data_path)");
}

std::vector<std::string> ConfigFlags::AllOverrides() const {
  std::vector<std::string> all = overrides;
  if (!coordinator.empty()) {
    all.push_back("cluster.coordinator_address=" + coordinator);
  }
  if (!secret_file.empty()) all.push_back("cluster.secret_file=" + secret_file);
  if (!state_dir.empty()) all.push_back("cluster.state_dir=" + state_dir);
  if (!data_path.empty()) {
    // Absolute, so that child processes anywhere find it.
    std::error_code ec;
    const std::string absolute =
        std::filesystem::absolute(data_path, ec).string();
    all.push_back("training.data_path=" + (ec ? data_path : absolute));
  }
  return all;
}

StatusOr<LoadedConfig> ConfigFlags::Load() const {
  return LoadConfig(config_path, AllOverrides());
}

void ResumeFlags::Register(FlagParser* parser) {
  parser->AddBool("fresh", &fresh,
                  "train from scratch, not from the newest committed "
                  "checkpoint");
  parser->AddInt("from-step", &from_step,
                 "resume from this committed checkpoint (default: the "
                 "newest)");
}

std::vector<std::string> ResumeFlags::Args() const {
  std::vector<std::string> args;
  if (fresh) args.push_back("--fresh");
  if (from_step > 0) {
    args.push_back("--from-step");
    args.push_back(std::to_string(from_step));
  }
  return args;
}

void MetricsFlag::Register(FlagParser* parser) {
  parser->AddString("metrics-address", &address,
                    "serve Prometheus metrics at http://HOST:PORT/metrics "
                    "(port 0: any free port; off when empty)");
}

StatusOr<std::unique_ptr<transport::MetricsServer>> MetricsFlag::Start() const {
  if (address.empty()) return std::unique_ptr<transport::MetricsServer>();
  auto server = std::make_unique<transport::MetricsServer>();
  RETURN_IF_ERROR(server->Start(address));
  return server;
}

int ParseOrExit(FlagParser* parser, int argc, char** argv,
                size_t max_positional) {
  Status s = parser->Parse(argc, argv, 2);
  if (parser->help_requested()) {
    std::cout << parser->Help();
    return 0;
  }
  if (!s.ok()) {
    std::cerr << "switchyard: " << s.message() << "\n";
    return 2;
  }
  if (parser->positional().size() > max_positional) {
    std::cerr << "switchyard: unexpected argument '"
              << parser->positional()[max_positional] << "' (see --help)\n";
    return 2;
  }
  return -1;
}

}  // namespace switchyard::cli
