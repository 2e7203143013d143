// Test helper: expert workers (WorkerService) each behind its own UCX data
// plane on loopback, as `switchyard worker` runs them. Header-only.
#ifndef SWITCHYARD_TESTS_TESTING_UCX_WORKERS_H_
#define SWITCHYARD_TESTS_TESTING_UCX_WORKERS_H_

#include <memory>
#include <string>
#include <vector>

#include "expert_worker/worker_service.h"
#include "tests/testing/data_plane_options.h"
#include "transport/data_plane.h"

namespace switchyard::testing {

class UcxWorkers {
 public:
  ~UcxWorkers() { Shutdown(); }

  // Starts `count` workers named w0, w1 ...; false (with the reason in
  // *error) if one cannot start.
  bool Start(const config::SwitchyardConfig& config, int count,
             std::string* error) {
    for (int w = 0; w < count; ++w) {
      auto worker = std::make_unique<expert_worker::WorkerService>(
          config, "w" + std::to_string(w));
      Status s = worker->Start();
      auto plane = transport::NewUcxDataPlane(testing::TestDataPlaneOptions());
      if (s.ok()) s = plane.status();
      if (s.ok()) {
        auto* raw = worker.get();
        s = (*plane)->Start([raw](transport::Message m, transport::Reply r) {
          raw->Handle(std::move(m), std::move(r));
        });
      }
      if (!s.ok()) {
        *error = s.ToString();
        return false;
      }
      workers_.push_back(std::move(worker));
      planes_.push_back(std::move(plane).value());
    }
    return true;
  }

  // Adds every worker (name, data address) to `routing`.
  void AddTo(control::RoutingTable* routing) const {
    for (size_t w = 0; w < workers_.size(); ++w) {
      auto* rw = routing->add_workers();
      rw->set_name("w" + std::to_string(w));
      rw->set_data_address(planes_[w]->address());
    }
  }

  bool ApplyRouting(const control::RoutingTable& routing) {
    for (auto& w : workers_) {
      if (!w->ApplyRouting(routing).ok()) return false;
    }
    return true;
  }

  expert_worker::WorkerService& worker(int w) { return *workers_[w]; }
  transport::DataPlane& plane(int w) { return *planes_[w]; }

  void Shutdown() {
    for (auto& p : planes_) p->Shutdown();  // Stop serving first.
    for (auto& w : workers_) w->Shutdown();
  }

 private:
  std::vector<std::unique_ptr<expert_worker::WorkerService>> workers_;
  std::vector<std::unique_ptr<transport::DataPlane>> planes_;
};

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_TESTING_UCX_WORKERS_H_
