// switchyard drain: hand a worker's shards to the others, live
// (docs/operations.md, "Scaling").
#include <chrono>
#include <iostream>
#include <thread>

#include "cli/commands.h"
#include "cli/config_flags.h"
#include "cli/coordinator_flags.h"
#include "cli/status_client.h"

namespace switchyard::cli {

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
  if (response->body_case() != control::Envelope::kDrainResponse) {
    std::cerr << "switchyard: the coordinator answered a drain request with "
                 "body "
              << response->body_case() << "\n";
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
                  << " was called off: the other workers cannot hold its "
                     "shards any more (the coordinator's log says why); it "
                     "keeps serving\n";
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
