#include "trainer/cluster_view.h"

namespace switchyard::trainer {

bool AllShardsReachable(const control::RoutingTable& routing) {
  if (routing.entries_size() == 0 || routing.hold()) return false;
  for (const auto& e : routing.entries()) {
    if (e.worker() < 0 || !routing.workers(e.worker()).confirmed()) {
      return false;
    }
  }
  return true;
}

bool ReadyToTrain(const control::RoutingTable& routing, int workers) {
  int confirmed = 0;
  for (const auto& w : routing.workers()) confirmed += w.confirmed();
  return confirmed >= workers && AllShardsReachable(routing);
}

void ClusterNews::PublishRouting(const control::RoutingTable& routing,
                                 uint64_t training_epoch,
                                 transport::DataPlane* plane) {
  if (training_epoch != 0 && routing.epoch() > training_epoch) {
    plane->FailPending(CancelledError("routing epoch " +
                                      std::to_string(routing.epoch()) +
                                      " abandons the step in flight"));
  }
  MutexLock lock(&mu);
  latest = routing;
  changed.NotifyAll();
}

void ClusterNews::NoteAck(const control::HeartbeatAck& ack) {
  {
    // Under the lock: a waiter's check and its wait are one step.
    MutexLock lock(&mu);
    committed = ack.committed_step();
    last_ack = std::chrono::steady_clock::now();
  }
  changed.NotifyAll();
}

void PeerLostReporter::SetSession(
    std::shared_ptr<control::MemberSession> session) {
  MutexLock lock(&mu_);
  session_ = std::move(session);
}

void PeerLostReporter::Report(const std::string& address, const Status& why) {
  control::PeerLost report;
  {
    MutexLock lock(&news_->mu);
    for (const auto& w : news_->latest.workers()) {
      if (w.data_address() == address) {
        report.set_peer(w.name());
        report.set_peer_incarnation(w.incarnation());
      }
    }
  }
  if (report.peer().empty()) return;  // Not a worker of the table.
  report.set_error(why.ToString());
  std::shared_ptr<control::MemberSession> session;
  {
    MutexLock lock(&mu_);
    if (!reported_.insert({report.peer(), report.peer_incarnation()}).second) {
      return;
    }
    session = session_;
  }
  if (session != nullptr) session->ReportPeerLost(std::move(report));
}

}  // namespace switchyard::trainer
