// What a trainer process knows of the cluster, shared by `switchyard train`
// (trainer_process.cc) and the PyTorch front end's session (moe_session.h):
// the newest routing table and committed checkpoint as the control thread
// hears them, when a table is one to train with, and the workers this
// trainer could not reach, reported to the coordinator once each.
#ifndef SWITCHYARD_TRAINER_CLUSTER_VIEW_H_
#define SWITCHYARD_TRAINER_CLUSTER_VIEW_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <utility>

#include "common/mutex.h"
#include "common/status.h"
#include "common/thread_annotations.h"
#include "control.pb.h"
#include "transport/control/member_session.h"
#include "transport/data_plane.h"

namespace switchyard::trainer {

// Every shard placed on a worker that has confirmed its address, and the
// cluster not held (RoutingTable.hold: the next epoch says where to go on).
bool AllShardsReachable(const control::RoutingTable& routing);

// All `workers` workers in the table, and every shard reachable: the table
// training can start with.
bool ReadyToTrain(const control::RoutingTable& routing, int workers);

// What the control thread hears of the cluster, for the training thread,
// which waits on `changed` for it.
struct ClusterNews {
  Mutex mu;
  CondVar changed;
  control::RoutingTable latest GUARDED_BY(mu);
  // The newest committed checkpoint, from heartbeat acknowledgements.
  int64_t committed GUARDED_BY(mu) = 0;
  // When the coordinator last acknowledged a heartbeat.
  std::chrono::steady_clock::time_point last_ack GUARDED_BY(mu);

  // The control thread's newer table. Under an epoch newer than
  // `training_epoch` (0: not training yet) the step in flight is abandoned
  // on every worker, so the data plane's pending requests fail at once
  // (a paused or cut-off peer would hold them until their deadline):
  // before the table is published, so that no request of the new epoch
  // can be caught by it.
  void PublishRouting(const control::RoutingTable& routing,
                      uint64_t training_epoch, transport::DataPlane* plane)
      EXCLUDES(mu);
  // A heartbeat acknowledgement: the newest committed step.
  void NoteAck(const control::HeartbeatAck& ack) EXCLUDES(mu);
};

// Reports a worker this trainer cannot reach to the coordinator, once per
// incarnation: it may still heartbeat, so its lease would not notice. The
// coordinator fences it and the cluster recovers.
// - Its data-plane connection failed with requests pending: reported at
//   once.
// - A request to it got no answer by its deadline: the worker may be hung
//   (a stuck compute thread heartbeats on), or rightly waiting for another
//   trainer's StepDone. A probe (MessageKind::kProbe, answered by the
//   worker's serving thread) tells the two apart: reported only when the
//   probe is not answered within `probe_timeout` either.
// Thread-safe.
class PeerLostReporter {
 public:
  explicit PeerLostReporter(ClusterNews* news) : news_(news) {}
  // Where reports go (reports before it are dropped): SetSession sends
  // them through the member's control session.
  void SetSink(std::function<void(control::PeerLost)> sink) EXCLUDES(mu_);
  void SetSession(std::shared_ptr<control::MemberSession> session)
      EXCLUDES(mu_);
  // The data plane probes go out on (set before it starts; it must outlive
  // this or be shut down first). Without one a deadline is reported at
  // once.
  void SetProbe(transport::DataPlane* plane,
                std::chrono::milliseconds probe_timeout) EXCLUDES(mu_);
  // DataPlane::set_peer_lost_handler's callback.
  void Report(const std::string& address, const Status& why) EXCLUDES(mu_);

 private:
  using Key = std::pair<std::string, uint64_t>;  // (worker, incarnation)
  // Sends `report` to the coordinator unless already sent.
  void ReportOnce(control::PeerLost report) EXCLUDES(mu_);

  ClusterNews* const news_;
  Mutex mu_;
  std::set<Key> reported_ GUARDED_BY(mu_);
  std::set<Key> probing_ GUARDED_BY(mu_);
  std::function<void(control::PeerLost)> sink_ GUARDED_BY(mu_);
  transport::DataPlane* plane_ GUARDED_BY(mu_) = nullptr;
  std::chrono::milliseconds probe_timeout_ GUARDED_BY(mu_){0};
};

}  // namespace switchyard::trainer

#endif  // SWITCHYARD_TRAINER_CLUSTER_VIEW_H_
