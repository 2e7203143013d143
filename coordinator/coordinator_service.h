// The coordinator process: control server + ClusterState + durable state.
//
// Serves registration, heartbeats, leave and status requests; expires leases
// on a timer; persists every state change to its RocksDB (synchronously,
// before anyone hears of it) and pushes the routing table to every connected
// member whenever the epoch changes.
//
// Thread-safety: Start/Shutdown from the owning thread; request handlers run
// on the io_context and serialize on mu_.
#ifndef SWITCHYARD_COORDINATOR_COORDINATOR_SERVICE_H_
#define SWITCHYARD_COORDINATOR_COORDINATOR_SERVICE_H_

#include <boost/asio.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "common/status.h"
#include "config.pb.h"
#include "coordinator/cluster_state.h"
#include "storage/kv_store.h"
#include "transport/control/server.h"

namespace switchyard::coordinator {

class CoordinatorService {
 public:
  // `secret` authenticates control connections. The state lives in
  // <cluster.state_dir>/coordinator.
  CoordinatorService(boost::asio::io_context& io,
                     config::SwitchyardConfig config, std::string secret);
  ~CoordinatorService();

  // Where training resumes (before Start): from scratch with `fresh`, else
  // from committed checkpoint `from_step` (0, the default: the newest).
  void SetResume(bool fresh, int64_t from_step) {
    fresh_ = fresh;
    from_step_ = from_step;
  }

  // Opens (or resumes) the state, listens, and writes the bound address to
  // <state_dir>/coordinator.addr.
  Status Start();
  void Shutdown();
  uint16_t port() const;

 private:
  void OnRequest(const control::Connection::Ptr& conn,
                 control::Envelope request);
  void OnClose(const control::Connection::Ptr& conn);
  void ScheduleTick();
  // Persists and pushes if the state changed. Requires mu_.
  void CommitLocked();

  boost::asio::io_context& io_;
  const config::SwitchyardConfig config_;
  const std::string secret_;
  bool fresh_ = false;
  int64_t from_step_ = 0;
  std::unique_ptr<control::ControlServer> server_;
  boost::asio::steady_timer tick_timer_;

  std::mutex mu_;
  std::unique_ptr<storage::KvStore> store_;  // GUARDED_BY(mu_)
  std::optional<ClusterState> state_;        // GUARDED_BY(mu_)
  uint64_t persisted_version_ = 0;           // GUARDED_BY(mu_)
  uint64_t pushed_routing_version_ = 0;      // GUARDED_BY(mu_)
  // Member name -> its current control connection (for pushes).
  std::map<std::string, control::Connection::Ptr> connections_;  // GUARDED_BY
  bool shut_down_ = false;                                       // GUARDED_BY
};

}  // namespace switchyard::coordinator

#endif  // SWITCHYARD_COORDINATOR_COORDINATOR_SERVICE_H_
