// The coordinator process: control server + ClusterState + durable state.
//
// Serves registration, heartbeats, leave and status requests; expires leases
// on a timer; persists every state change to its KvStore (synchronously,
// before anyone hears of it) and pushes the routing table to every connected
// member whenever the epoch changes. The store is handed in (the binary opens
// OpenCoordinatorStore's RocksDB; tests may wrap a store to inject faults).
//
// Thread-safety: SetResume/Start/Shutdown/port from the owning thread;
// request handlers run on the io_context and serialize on mu_.
#ifndef SWITCHYARD_COORDINATOR_COORDINATOR_SERVICE_H_
#define SWITCHYARD_COORDINATOR_COORDINATOR_SERVICE_H_

#include <boost/asio.hpp>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "common/mutex.h"
#include "common/status.h"
#include "common/thread_annotations.h"
#include "config.pb.h"
#include "coordinator/cluster_state.h"
#include "storage/kv_store.h"
#include "transport/control/server.h"

namespace switchyard::coordinator {

// The coordinator's durable store: a RocksDB in <cluster.state_dir>/
// coordinator, created if missing.
StatusOr<std::unique_ptr<storage::KvStore>> OpenCoordinatorStore(
    const config::SwitchyardConfig& config);

class CoordinatorService {
 public:
  // `secret` authenticates control connections. `store` (not null) holds the
  // state between runs: a store holding a snapshot resumes it.
  CoordinatorService(boost::asio::io_context& io,
                     config::SwitchyardConfig config, std::string secret,
                     std::unique_ptr<storage::KvStore> store);
  ~CoordinatorService();

  // Where training resumes (before Start): from scratch with `fresh`, else
  // from committed checkpoint `from_step` (0, the default: the newest).
  void SetResume(bool fresh, int64_t from_step) {
    fresh_ = fresh;
    from_step_ = from_step;
  }

  // Resumes the store's state (or starts a new run) and persists it at its
  // new epoch, listens, and writes the bound address to
  // <state_dir>/coordinator.addr.
  Status Start() EXCLUDES(mu_);
  void Shutdown() EXCLUDES(mu_);
  // OK, or why the coordinator stopped by itself (its state is older than
  // its members know: see ClusterState::Register); the process should exit
  // with it once the io_context has stopped.
  Status failure() const EXCLUDES(mu_);
  uint16_t port() const;

 private:
  void OnRequest(const control::Connection::Ptr& conn,
                 control::Envelope request) EXCLUDES(mu_);
  void OnClose(const control::Connection::Ptr& conn) EXCLUDES(mu_);
  void ScheduleTick();
  // Persists and pushes if the state changed.
  // Makes the state durable (when it changed) and then pushes a changed
  // routing table; an error when the store refused the write (the table is
  // then not pushed, and the write is retried on the next change or tick).
  Status CommitLocked() REQUIRES(mu_);
  // Pushes the routing table to every member now, or (within
  // kMinPushInterval of the last push) once that has passed.
  void PushLocked() REQUIRES(mu_);
  static constexpr std::chrono::milliseconds kMinPushInterval{5};
  // The coordinator's state cannot be trusted (`why`): it stops serving and
  // stops its io_context; failure() says why.
  void FailLocked(const Status& why) REQUIRES(mu_);
  // For a new run: FAILED_PRECONDITION when workers' checkpoint stores in
  // this run's checkpoint directory already hold checkpoints (the run's
  // coordinator state was deleted or lost), unless --fresh.
  Status CheckNoOrphanedCheckpoints() const;

  boost::asio::io_context& io_;
  const config::SwitchyardConfig config_;
  const std::string secret_;
  bool fresh_ = false;
  int64_t from_step_ = 0;
  std::unique_ptr<control::ControlServer> server_;
  boost::asio::steady_timer tick_timer_;
  boost::asio::steady_timer push_timer_;

  mutable Mutex mu_;
  Status failure_ GUARDED_BY(mu_);
  const std::unique_ptr<storage::KvStore> store_ PT_GUARDED_BY(mu_);
  std::optional<ClusterState> state_ GUARDED_BY(mu_);
  uint64_t persisted_version_ GUARDED_BY(mu_) = 0;
  uint64_t pushed_routing_version_ GUARDED_BY(mu_) = 0;
  std::chrono::steady_clock::time_point last_push_ GUARDED_BY(mu_);
  bool push_scheduled_ GUARDED_BY(mu_) = false;
  // Member name -> its current control connection (for pushes).
  std::map<std::string, control::Connection::Ptr> connections_ GUARDED_BY(mu_);
  bool shut_down_ GUARDED_BY(mu_) = false;
};

}  // namespace switchyard::coordinator

#endif  // SWITCHYARD_COORDINATOR_COORDINATOR_SERVICE_H_
