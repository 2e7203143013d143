// switchyard coordinator | worker | train: the long-running processes.
#include <boost/asio.hpp>
#include <iostream>

#include "cli/commands.h"
#include "cli/config_flags.h"
#include "coordinator/coordinator_service.h"
#include "expert_worker/worker_process.h"
#include "trainer/trainer_process.h"
#include "transport/control/auth.h"

namespace switchyard::cli {
namespace {

// Loads the configuration and the secret, or prints why not.
bool LoadConfigAndSecret(const ConfigFlags& flags, LoadedConfig* loaded,
                         std::string* secret) {
  auto config = flags.Load();
  if (!config.ok()) {
    std::cerr << "switchyard: " << config.status().message() << "\n";
    return false;
  }
  *loaded = std::move(config).value();
  auto s = control::ReadSecretFile(loaded->config.cluster().secret_file());
  if (!s.ok()) {
    std::cerr << "switchyard: " << s.status().message() << "\n";
    return false;
  }
  *secret = std::move(s).value();
  return true;
}

int Finish(const Status& s) {
  if (s.ok()) return 0;
  std::cerr << "switchyard: " << s.ToString() << "\n";
  return s.code() == StatusCode::kInvalidArgument ? 2 : 1;
}

}  // namespace

int CoordinatorCommand(int argc, char** argv) {
  FlagParser parser(
      "switchyard coordinator --config FILE [flags]",
      "Runs the coordinator: membership, placement, routing tables. Its state\n"
      "lives in <cluster.state_dir>/coordinator; a restart resumes it.");
  ConfigFlags flags;
  flags.Register(&parser);
  if (int rc = ParseOrExit(&parser, argc, argv); rc >= 0) return rc;
  LoadedConfig loaded;
  std::string secret;
  if (!LoadConfigAndSecret(flags, &loaded, &secret)) return 2;

  boost::asio::io_context io;
  coordinator::CoordinatorService service(io, loaded.config, secret);
  Status started = service.Start();
  if (!started.ok()) return Finish(started);
  boost::asio::signal_set signals(io, SIGTERM, SIGINT);
  signals.async_wait([&](const boost::system::error_code& ec, int sig) {
    if (ec) return;
    LOG(INFO) << "coordinator: received signal " << sig << ", stopping";
    service.Shutdown();
    io.stop();
  });
  io.run();
  return 0;
}

int WorkerCommand(int argc, char** argv) {
  FlagParser parser(
      "switchyard worker --config FILE --name NAME [flags]",
      "Runs an expert worker: joins the cluster and hosts the shards the\n"
      "coordinator places on it. SIGTERM/SIGINT leave the cluster cleanly.");
  ConfigFlags flags;
  flags.Register(&parser);
  expert_worker::WorkerOptions options;
  parser.AddString("name", &options.name,
                   "stable worker name, e.g. worker-0 (required)");
  int64_t capacity = 0;
  parser.AddInt("capacity-bytes", &capacity,
                "memory offered for shards (0: cluster.worker_capacity_bytes)");
  parser.AddString("device", &options.device, "cpu or cuda:N");
  parser.AddString("data-address", &options.data_address,
                   "data-plane address advertised to trainers");
  if (int rc = ParseOrExit(&parser, argc, argv); rc >= 0) return rc;
  options.capacity_bytes = capacity;
  LoadedConfig loaded;
  std::string secret;
  if (!LoadConfigAndSecret(flags, &loaded, &secret)) return 2;
  return Finish(expert_worker::RunWorker(loaded.config, secret, options));
}

int TrainCommand(int argc, char** argv) {
  FlagParser parser(
      "switchyard train --config FILE --rank R [flags]",
      "Runs one data-parallel trainer with rank R in [0, cluster.trainers).\n"
      "SIGTERM/SIGINT leave the cluster cleanly.");
  ConfigFlags flags;
  flags.Register(&parser);
  trainer::TrainerOptions options;
  int64_t rank = 0;
  parser.AddInt("rank", &rank, "data-parallel rank");
  parser.AddString("name", &options.name,
                   "member name (default trainer-<rank>)");
  if (int rc = ParseOrExit(&parser, argc, argv); rc >= 0) return rc;
  options.rank = static_cast<int>(rank);
  LoadedConfig loaded;
  std::string secret;
  if (!LoadConfigAndSecret(flags, &loaded, &secret)) return 2;
  return Finish(trainer::RunTrainer(loaded.config, secret, options));
}

}  // namespace switchyard::cli
