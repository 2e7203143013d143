// PeerLostReporter over real UCX data planes: a worker whose request goes
// unanswered is reported lost only when a probe goes unanswered too (a
// worker that answers the probe may rightly be waiting for another
// trainer's StepDone); each incarnation is reported once.
#include "trainer/cluster_view.h"

#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tests/testing/data_plane_options.h"

namespace switchyard::trainer {
namespace {

using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;
using transport::Message;
using transport::MessageKind;

// A worker's data plane that never answers a request, and answers probes
// only when `answers_probes`. Replies held are dropped at shutdown.
class SilentWorker {
 public:
  explicit SilentWorker(bool answers_probes) {
    plane_ =
        transport::NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
    EXPECT_TRUE(
        plane_
            ->Start([this, answers_probes](Message request,
                                           transport::Reply reply) {
              if (answers_probes &&
                  request.header.kind ==
                      static_cast<uint8_t>(MessageKind::kProbe)) {
                reply(transport::TensorResponse(request.header, Tensor()));
                return;
              }
              std::lock_guard<std::mutex> lock(mu_);
              held_.push_back(std::move(reply));
            })
            .ok());
  }
  ~SilentWorker() { plane_->Shutdown(); }
  std::string address() const { return plane_->address(); }

 private:
  std::unique_ptr<transport::DataPlane> plane_;
  std::mutex mu_;
  std::vector<transport::Reply> held_;
};

class PeerLostReporterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    control::RoutingTable table;
    table.set_epoch(4);
    auto* a = table.add_workers();
    a->set_name("worker-0");
    a->set_incarnation(3);
    a->set_data_address(waiting_.address());
    auto* b = table.add_workers();
    b->set_name("worker-1");
    b->set_incarnation(7);
    b->set_data_address(hung_.address());
    {
      MutexLock lock(&news_.mu);
      news_.latest = table;
    }
    client_ =
        transport::NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
    client_->set_peer_lost_handler(
        [this](const std::string& peer, const Status& why) {
          reporter_.Report(peer, why);
        });
    reporter_.SetProbe(client_.get(), Ms(300));
    reporter_.SetSink([this](control::PeerLost report) {
      std::lock_guard<std::mutex> lock(mu_);
      reports_.push_back(std::move(report));
    });
    ASSERT_TRUE(client_->Start(transport::RefuseRequests("a trainer")).ok());
  }
  void TearDown() override { client_->Shutdown(); }

  // Sends a forward nobody answers, with a 200 ms deadline.
  Status Unanswered(const std::string& peer) {
    Message m;
    m.header.kind = static_cast<uint8_t>(MessageKind::kExpertForward);
    m.header.epoch = 4;
    return client_->SendSync(peer, std::move(m), Ms(200)).status();
  }
  std::vector<control::PeerLost> Reports(size_t want, Ms within) {
    const auto until = Clock::now() + within;
    while (true) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (reports_.size() >= want || Clock::now() >= until) return reports_;
      }
      std::this_thread::sleep_for(Ms(5));
    }
  }

  SilentWorker waiting_{/*answers_probes=*/true};
  SilentWorker hung_{/*answers_probes=*/false};
  ClusterNews news_;
  PeerLostReporter reporter_{&news_};
  std::unique_ptr<transport::DataPlane> client_;
  std::mutex mu_;
  std::vector<control::PeerLost> reports_;
};

TEST_F(PeerLostReporterTest, AWorkerThatAnswersTheProbeIsNotReported) {
  EXPECT_EQ(Unanswered(waiting_.address()).code(),
            StatusCode::kDeadlineExceeded);
  // The probe is answered within its 300 ms; nothing comes, even later.
  EXPECT_TRUE(Reports(1, Ms(1500)).empty());
  // Asked again at its next silence: still not reported.
  EXPECT_EQ(Unanswered(waiting_.address()).code(),
            StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(Reports(1, Ms(1000)).empty());
}

TEST_F(PeerLostReporterTest, AWorkerThatAnswersNothingIsReportedOnce) {
  const auto start = Clock::now();
  EXPECT_EQ(Unanswered(hung_.address()).code(), StatusCode::kDeadlineExceeded);
  const auto reports = Reports(1, Ms(5000));
  ASSERT_EQ(reports.size(), 1u);
  // The request's deadline (200 ms), then the probe's (300 ms).
  EXPECT_GE(Clock::now() - start, Ms(450));
  EXPECT_EQ(reports[0].peer(), "worker-1");
  EXPECT_EQ(reports[0].peer_incarnation(), 7u);
  EXPECT_NE(reports[0].error().find("DEADLINE_EXCEEDED"), std::string::npos)
      << reports[0].error();
  EXPECT_NE(reports[0].error().find("a probe then went unanswered too"),
            std::string::npos)
      << reports[0].error();
  // Once per incarnation.
  EXPECT_EQ(Unanswered(hung_.address()).code(), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(Reports(2, Ms(1000)).size(), 1u);
}

TEST_F(PeerLostReporterTest, AGivenUpProbeReportsNothing) {
  // A new epoch fails everything pending, the probe included: no verdict.
  EXPECT_EQ(Unanswered(hung_.address()).code(), StatusCode::kDeadlineExceeded);
  std::this_thread::sleep_for(Ms(50));
  client_->FailPending(CancelledError("routing epoch 5 abandons the step"));
  EXPECT_TRUE(Reports(1, Ms(1000)).empty());
}

}  // namespace
}  // namespace switchyard::trainer
