#include "trainer/cluster_view.h"

#include <glog/logging.h>

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

void PeerLostReporter::SetSink(std::function<void(control::PeerLost)> sink) {
  MutexLock lock(&mu_);
  sink_ = std::move(sink);
}

void PeerLostReporter::SetSession(
    std::shared_ptr<control::MemberSession> session) {
  SetSink([session = std::move(session)](control::PeerLost report) {
    session->ReportPeerLost(std::move(report));
  });
}

void PeerLostReporter::SetProbe(transport::DataPlane* plane,
                                std::chrono::milliseconds probe_timeout) {
  MutexLock lock(&mu_);
  plane_ = plane;
  probe_timeout_ = probe_timeout;
}

void PeerLostReporter::Report(const std::string& address, const Status& why) {
  control::PeerLost report;
  uint64_t epoch = 0;
  {
    MutexLock lock(&news_->mu);
    epoch = news_->latest.epoch();
    for (const auto& w : news_->latest.workers()) {
      if (w.data_address() == address) {
        report.set_peer(w.name());
        report.set_peer_incarnation(w.incarnation());
      }
    }
  }
  if (report.peer().empty()) return;  // Not a worker of the table.
  report.set_error(why.ToString());
  if (why.code() != StatusCode::kDeadlineExceeded) return ReportOnce(report);
  const Key key(report.peer(), report.peer_incarnation());
  transport::DataPlane* plane = nullptr;
  std::chrono::milliseconds timeout{0};
  {
    MutexLock lock(&mu_);
    // The probe's own deadline comes here too: its callback decides.
    if (reported_.count(key) || !probing_.insert(key).second) return;
    plane = plane_;
    timeout = probe_timeout_;
  }
  if (plane == nullptr) return ReportOnce(report);
  transport::Message probe;
  probe.header.kind = static_cast<uint8_t>(transport::MessageKind::kProbe);
  probe.header.epoch = epoch;
  plane->Send(address, std::move(probe), timeout,
              [this, report, key](StatusOr<transport::Message> answer) {
                {
                  MutexLock lock(&mu_);
                  probing_.erase(key);
                }
                if (answer.ok()) {
                  LOG(WARNING)
                      << report.peer() << " left a request unanswered by its "
                      << "deadline but answers a probe: not reported lost "
                      << "(it may be waiting for another member)";
                  return;
                }
                // Given up here (a new epoch, or shutting down): no verdict.
                if (answer.status().code() == StatusCode::kCancelled) return;
                control::PeerLost lost = report;
                lost.set_error(lost.error() + "; a probe then went " +
                               "unanswered too: " + answer.status().ToString());
                ReportOnce(std::move(lost));
              });
}

void PeerLostReporter::ReportOnce(control::PeerLost report) {
  std::function<void(control::PeerLost)> sink;
  {
    MutexLock lock(&mu_);
    if (!reported_.insert({report.peer(), report.peer_incarnation()}).second) {
      return;
    }
    sink = sink_;
  }
  if (sink) sink(std::move(report));
}

}  // namespace switchyard::trainer
