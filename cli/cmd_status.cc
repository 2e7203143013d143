// switchyard status: print the cluster as the coordinator sees it.
// switchyard drain: hand a worker's shards to the others, live.
#include <chrono>
#include <fstream>
#include <iostream>
#include <thread>

#include "cli/commands.h"
#include "cli/config_flags.h"
#include "cli/status_client.h"
#include "transport/control/auth.h"

namespace switchyard::cli {

namespace {

// How a command reaches the coordinator: --run-dir, or the configuration's
// address and secret file.
struct CoordinatorFlags {
  ConfigFlags config;
  std::string run_dir;
  int64_t timeout_ms = 5000;

  void Register(FlagParser* parser) {
    config.Register(parser);
    parser->AddString("run-dir", &run_dir,
                      "directory of a `switchyard up` cluster");
    parser->AddInt("timeout-ms", &timeout_ms, "deadline of each request");
  }
  // The address and secret; on failure prints why and returns the exit
  // code (1: no running cluster found, 2: bad flags or configuration).
  int Resolve(HostPort* address, std::string* secret) {
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
  std::chrono::milliseconds timeout() const {
    return std::chrono::milliseconds(timeout_ms);
  }
};

}  // namespace

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

int DrainCommand(int argc, char** argv) {
  FlagParser parser(
      "switchyard drain WORKER [--run-dir DIR | --config FILE] [flags]",
      "Drains a worker while the run trains: at the next step boundary its\n"
      "shards (parameters and optimizer state) move live to the other\n"
      "workers, nothing rolled back or redone; then the worker leaves and\n"
      "exits 0. Refused, the worker serving on, when the others cannot hold\n"
      "its shards. Waits until the worker has left (--wait=false: returns\n"
      "once the drain is accepted), printing the shards it still holds.\n"
      "Exit 0: drained (or accepted); 1: refused, failed or timed out.");
  CoordinatorFlags where;
  where.Register(&parser);
  bool cancel = false;
  bool wait = true;
  int64_t wait_ms = 300000;
  parser.AddBool("cancel", &cancel,
                 "stop draining the worker (it keeps, or gets, shards)");
  parser.AddBool("wait", &wait, "wait until the worker has left");
  parser.AddInt("wait-ms", &wait_ms, "how long --wait waits");
  if (int rc = ParseOrExit(&parser, argc, argv, 1); rc >= 0) return rc;
  if (parser.positional().size() != 1) {
    std::cerr << "switchyard: drain takes one worker name\n\n" << parser.Help();
    return 2;
  }
  const std::string worker = parser.positional()[0];
  HostPort address;
  std::string secret;
  if (int rc = where.Resolve(&address, &secret); rc != 0) return rc;
  control::Envelope request;
  request.mutable_drain_request()->set_worker(worker);
  request.mutable_drain_request()->set_cancel(cancel);
  auto response =
      CallCoordinator(address, secret, where.timeout(), std::move(request));
  if (!response.ok()) {
    std::cerr << "switchyard: drain " << worker << ": "
              << response.status().ToString() << "\n";
    return 1;
  }
  std::cout << response->drain_response().message() << std::endl;
  if (cancel || !wait) return 0;
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
  int last_shards = -1;
  while (std::chrono::steady_clock::now() < deadline) {
    auto status = FetchStatus(address, secret, where.timeout());
    if (!status.ok()) {
      std::cerr << "switchyard: status from " << address.ToString() << ": "
                << status.status().ToString() << "\n";
      return 1;
    }
    for (const auto& m : status->members()) {
      if (m.name() != worker) continue;
      if (m.state() == control::LEFT) {
        std::cout << worker << " drained and left" << std::endl;
        return 0;
      }
      if (m.state() == control::DEAD) {
        std::cerr << "switchyard: " << worker
                  << " died while draining; the cluster recovers its shards "
                     "from the newest committed checkpoint\n";
        return 1;
      }
      if (!m.draining()) {
        std::cerr << "switchyard: the drain of " << worker
                  << " was called off (see the coordinator's log; "
                  << status->placement_error() << "); it keeps serving\n";
        return 1;
      }
      if (m.shards() != last_shards) {
        last_shards = m.shards();
        std::cout << worker << ": " << m.shards() << " shards left"
                  << (status->pending_move().empty()
                          ? ""
                          : " (waiting for the trainers' step boundary)")
                  << std::endl;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::cerr << "switchyard: " << worker << " had not left within " << wait_ms
            << " ms (--wait-ms)\n";
  return 1;
}

}  // namespace switchyard::cli
