// The DataPlane contract over every built backend (UCX and the in-process
// plane): payloads from 4 KiB to 256 MiB, concurrency, waiters, deadlines,
// errors and shutdown. The helpers are in data_plane_test_util.h.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/buffer_pool.h"
#include "tests/transport/data_plane_test_util.h"
#include "transport/data_plane.h"

namespace switchyard::transport::data_plane_testing {
namespace {

// The DataPlane contract, over every backend.
class DataPlaneTest : public DataPlanePairTest,
                      public ::testing::WithParamInterface<Backend> {
 protected:
  Backend backend() const override { return GetParam(); }
};

INSTANTIATE_TEST_SUITE_P(Backends, DataPlaneTest,
                         ::testing::Values(Backend::kUcx, Backend::kInProcess),
                         BackendName);

TEST_P(DataPlaneTest, EchoesSmallAndLargePayloads) {
  // 4 KiB (eager) up to 256 MiB (rendezvous, straight into the tensor).
  for (int64_t bytes : {int64_t{4} << 10, int64_t{64} << 10, int64_t{1} << 20,
                        int64_t{64} << 20, int64_t{256} << 20}) {
    const int64_t cols = 1024;
    Message request = EchoRequest(bytes / 4 / cols, cols, 7);
    Message copy;
    copy.payload = request.payload.Clone();
    auto r =
        client_->SendSync(server_->address(), std::move(request), Ms(60000));
    ASSERT_TRUE(r.ok()) << bytes << ": " << r.status().ToString();
    EXPECT_EQ(r->header.payload_bytes, static_cast<uint64_t>(bytes));
    EXPECT_TRUE(SamePayload(*r, copy)) << bytes;
  }
}

TEST_P(DataPlaneTest, SendAllConvertsBf16AnswersIntoPoolBuffers) {
  // Small integers: exact in bf16, so the round trip must give them back.
  Tensor values = Tensor::Zeros(DType::kF32, {64, 256}).value();
  for (int64_t i = 0; i < values.num_elements(); ++i) {
    values.f32()[i] = static_cast<float>(i % 251) - 125.0f;
  }
  WireHeader header;
  header.kind = static_cast<uint8_t>(MessageKind::kEcho);
  const std::shared_ptr<BufferPool> pool = BufferPool::Create(size_t{1} << 30);
  for (BufferPool* with : {pool.get(), static_cast<BufferPool*>(nullptr)}) {
    std::vector<Outgoing> requests;
    for (int i = 0; i < 3; ++i) {
      requests.push_back({server_->address(),
                          TensorMessage(header, values.To(DType::kBF16)),
                          "echo " + std::to_string(i)});
    }
    auto replies = SendAll(client_.get(), std::move(requests), Ms(30000), with);
    ASSERT_TRUE(replies.ok()) << replies.status().ToString();
    ASSERT_EQ(replies->size(), 3u);
    for (const Tensor& r : *replies) {
      ASSERT_EQ(r.dtype(), DType::kF32);
      ASSERT_EQ(r.num_bytes(), values.num_bytes());
      EXPECT_EQ(std::memcmp(r.data(), values.data(), values.num_bytes()), 0);
    }
    // The first round's three replies are pool buffers, all in use.
    if (with != nullptr) {
      EXPECT_EQ(pool->cached_bytes(), 0u);
    }
  }
  // The first three came from the pool and went back to it.
  EXPECT_GE(pool->cached_bytes(), 3 * values.num_bytes());
}

TEST_P(DataPlaneTest, ManyConcurrentRequests) {
  // Alternate eager and rendezvous sizes.
  EXPECT_EQ(EchoFromThreads(4, 50,
                            [](int t, int i) {
                              return EchoRequest(i % 2 ? 4 : 64, 1024,
                                                 t * 1000 + i);
                            }),
            4 * 50);
}

TEST_P(DataPlaneTest, ManyWaitersAtOnceAllGetTheirOwnAnswers) {
  // One waiter drives at a time; the others see their answers arrive
  // through it, or take over when it leaves.
  EXPECT_EQ(EchoFromThreads(8, 200,
                            [](int t, int i) {
                              return EchoRequest(1, 64 + t, t * 1000 + i);
                            }),
            8 * 200);
}

TEST_P(DataPlaneTest, CallbackSendsAfterAWaiterLeftAreAnsweredPromptly) {
  // A plain Send after a while idle is answered at once. UCX: after a
  // waiter leaves with nothing in flight the progress thread stays parked;
  // a plain Send must unpark it, not wait for its next look (up to 64 ms
  // once idle).
  std::vector<double> ms;
  for (int i = 0; i < 12; ++i) {
    ASSERT_TRUE(
        client_->SendSync(server_->address(), EchoRequest(1, 16, i), Ms(5000))
            .ok());
    std::this_thread::sleep_for(Ms(150));  // Its looks grow to 64 ms apart.
    std::mutex mu;
    std::condition_variable cv;
    bool answered = false;
    const auto start = Clock::now();
    client_->Send(server_->address(), EchoRequest(1, 16, 100 + i), Ms(5000),
                  [&](StatusOr<Message> r) {
                    EXPECT_TRUE(r.ok()) << r.status().ToString();
                    std::lock_guard<std::mutex> lock(mu);
                    answered = true;
                    cv.notify_one();
                  });
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, Ms(5000), [&] { return answered; }));
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start)
                     .count());
  }
  std::sort(ms.begin(), ms.end());
  // Typically well under 1 ms; a missed wake-up costs tens of ms.
  EXPECT_LT(ms[ms.size() / 2], 10.0);
}

TEST_P(DataPlaneTest, ShutdownReleasesAWaiter) {
  std::thread shut([&] {
    std::this_thread::sleep_for(Ms(200));
    client_->Shutdown();
  });
  const auto start = Clock::now();
  auto r = client_->SendSync(server_->address(), EchoRequest(1, 16, 1, 999),
                             Ms(30000));
  shut.join();
  EXPECT_EQ(r.status().code(), StatusCode::kCancelled) << r.status().ToString();
  EXPECT_LT(Clock::now() - start, Ms(5000));
}

// A sender that gives up on what it has pending (a trainer told of a new
// routing epoch) releases its waiter at once with its own status, and
// later requests go through as usual.
TEST_P(DataPlaneTest, FailPendingReleasesAWaiterAndLaterSendsWork) {
  std::thread give_up([&] {
    std::this_thread::sleep_for(Ms(200));
    client_->FailPending(CancelledError("epoch 7 abandons the step"));
  });
  const auto start = Clock::now();
  auto r = client_->SendSync(server_->address(), EchoRequest(1, 16, 1, 999),
                             Ms(30000));
  give_up.join();
  EXPECT_EQ(r.status().code(), StatusCode::kCancelled) << r.status().ToString();
  EXPECT_NE(r.status().message().find("epoch 7"), std::string::npos);
  EXPECT_LT(Clock::now() - start, Ms(5000));
  auto ok =
      client_->SendSync(server_->address(), EchoRequest(1, 16, 2), Ms(5000));
  EXPECT_TRUE(ok.ok()) << ok.status().ToString();
  // Giving up is not the peer's failure.
  EXPECT_TRUE(LostReports(0).empty());
}

// A request nobody answers fails at its deadline, and the peer is reported
// to the peer-lost handler (a trainer then probes it before blaming it).
TEST_P(DataPlaneTest, SilentServerGivesDeadlineThenKeepsServing) {
  const auto start = Clock::now();
  auto r = client_->SendSync(server_->address(), EchoRequest(1, 16, 1, 999),
                             Ms(300));
  EXPECT_EQ(r.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_LT(Clock::now() - start, Ms(2000));
  const auto lost = LostReports(1);
  ASSERT_EQ(lost.size(), 1u);
  EXPECT_EQ(lost[0].first, server_->address());
  EXPECT_EQ(lost[0].second, StatusCode::kDeadlineExceeded);
  auto ok =
      client_->SendSync(server_->address(), EchoRequest(1, 16, 2), Ms(5000));
  EXPECT_TRUE(ok.ok()) << ok.status().ToString();
}

TEST_P(DataPlaneTest, DeadlinesExpireInOrderAmongManyAnsweredRequests) {
  // Answered requests leave their deadlines behind (dropped lazily, the
  // lot rebuilt when mostly stale): a silent request with a long deadline
  // stays pending through hundreds of answered ones, and three short ones
  // still expire at their own deadlines, shortest first.
  struct Expired {
    std::mutex mu;
    std::vector<std::pair<int, StatusCode>> tags;
    std::vector<Clock::duration> after;
  };
  // Shared: the 60 s request's callback runs at TearDown's shutdown.
  auto expired = std::make_shared<Expired>();
  const auto start = Clock::now();
  auto expect_expiry = [&](int tag, Ms timeout) {
    client_->Send(server_->address(), EchoRequest(1, 16, tag, 999), timeout,
                  [expired, start, tag](StatusOr<Message> r) {
                    std::lock_guard<std::mutex> lock(expired->mu);
                    expired->tags.emplace_back(tag, r.status().code());
                    expired->after.push_back(Clock::now() - start);
                  });
  };
  expect_expiry(0, Ms(60000));
  for (int i = 0; i < 300; ++i) {
    ASSERT_TRUE(
        client_->SendSync(server_->address(), EchoRequest(1, 16, i), Ms(60000))
            .ok());
  }
  const auto sent = Clock::now();
  expect_expiry(3, Ms(900));
  expect_expiry(1, Ms(300));
  expect_expiry(2, Ms(600));
  for (int i = 0; i < 300; ++i) {
    ASSERT_TRUE(
        client_->SendSync(server_->address(), EchoRequest(1, 16, i), Ms(60000))
            .ok());
  }
  const auto waited = Clock::now() + Ms(10000);
  while (Clock::now() < waited) {
    {
      std::lock_guard<std::mutex> lock(expired->mu);
      if (expired->tags.size() >= 3) break;
    }
    std::this_thread::sleep_for(Ms(10));
  }
  std::lock_guard<std::mutex> lock(expired->mu);
  ASSERT_EQ(expired->tags.size(), 3u);  // Not the 60 s one.
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(expired->tags[i].first, i + 1);
    EXPECT_EQ(expired->tags[i].second, StatusCode::kDeadlineExceeded);
    EXPECT_GE(expired->after[i], sent - start + Ms(300 * (i + 1)));
    EXPECT_LT(expired->after[i], sent - start + Ms(300 * (i + 1) + 1500));
  }
}

TEST_P(DataPlaneTest, ALateAnswerDoesNotCompleteALaterRequest) {
  // Request ids are never reused: the answer to an expired request, sent
  // after a new request took its place, is dropped, and the new request
  // gets its own answer.
  auto expired = client_->SendSync(server_->address(),
                                   EchoRequest(1, 16, 1, 999), Ms(200));
  ASSERT_EQ(expired.status().code(), StatusCode::kDeadlineExceeded);
  struct Answer {
    std::mutex mu;
    std::condition_variable cv;
    std::optional<StatusOr<Message>> result;
  };
  // Shared: on a failed assertion the callback runs at TearDown.
  auto answer = std::make_shared<Answer>();
  client_->Send(server_->address(), EchoRequest(1, 16, 2, 999), Ms(10000),
                [answer](StatusOr<Message> r) {
                  std::lock_guard<std::mutex> lock(answer->mu);
                  answer->result = std::move(r);
                  answer->cv.notify_one();
                });
  const auto held = Clock::now() + Ms(5000);
  while (Clock::now() < held) {
    {
      std::lock_guard<std::mutex> lock(held_mu_);
      if (held_.size() == 2) break;
    }
    std::this_thread::sleep_for(Ms(5));
  }
  std::vector<Reply> replies;
  {
    std::lock_guard<std::mutex> lock(held_mu_);
    replies = std::move(held_);
  }
  ASSERT_EQ(replies.size(), 2u);
  const Message late = EchoRequest(1, 16, 71);
  const Message own = EchoRequest(1, 16, 72);
  replies[0](TensorResponse(late.header, late.payload.Clone()));
  std::this_thread::sleep_for(Ms(100));
  {
    std::lock_guard<std::mutex> lock(answer->mu);
    EXPECT_FALSE(answer->result.has_value()) << "completed by the late answer";
  }
  replies[1](TensorResponse(own.header, own.payload.Clone()));
  std::unique_lock<std::mutex> lock(answer->mu);
  ASSERT_TRUE(answer->cv.wait_for(lock, Ms(5000),
                                  [&] { return answer->result.has_value(); }));
  ASSERT_TRUE(answer->result->ok()) << answer->result->status().ToString();
  EXPECT_TRUE(SamePayload(**answer->result, own));
}

TEST_P(DataPlaneTest, HandlerErrorsReachTheCaller) {
  auto r = client_->SendSync(server_->address(), EchoRequest(1, 16, 1, -1),
                             Ms(5000));
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(r.status().message(), "unknown shard L9.E9.S9");
}

TEST_P(DataPlaneTest, SendAfterShutdownIsCancelledNotLost) {
  const std::string address = server_->address();
  client_->Shutdown();
  const auto start = Clock::now();
  auto r = client_->SendSync(address, EchoRequest(1, 16, 1), Ms(60000));
  EXPECT_EQ(r.status().code(), StatusCode::kCancelled);
  EXPECT_LT(Clock::now() - start, Ms(1000));
}

TEST_P(DataPlaneTest, UnreachablePeerFailsInTime) {
  const auto start = Clock::now();
  // Nothing listens on port 1.
  auto r = client_->SendSync("127.0.0.1:1", EchoRequest(1, 16, 1), Ms(2000));
  EXPECT_FALSE(r.ok());
  EXPECT_LT(Clock::now() - start, Ms(4000));
}

}  // namespace
}  // namespace switchyard::transport::data_plane_testing
