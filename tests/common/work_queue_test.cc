// WorkQueue: order, closing, draining, a consumer woken by a producer, and
// a wait ended by Interrupt.
#include "common/work_queue.h"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>
#include <vector>

namespace switchyard {
namespace {

TEST(WorkQueueTest, PopsInPushOrderWithDeferredWorkInFront) {
  WorkQueue<int> q;
  EXPECT_FALSE(q.Push(3).has_value());
  EXPECT_FALSE(q.Push(4).has_value());
  q.PushFront({1, 2});
  EXPECT_EQ(q.size(), 4u);
  for (int want : {1, 2, 3, 4}) EXPECT_EQ(q.Pop(), want);
  EXPECT_EQ(q.size(), 0u);
}

TEST(WorkQueueTest, ClosedRefusesPushesAndLeavesTheRestToDrain) {
  WorkQueue<int> q;
  EXPECT_FALSE(q.Push(1).has_value());
  EXPECT_FALSE(q.Push(2).has_value());
  q.Close();
  EXPECT_TRUE(q.closed());
  EXPECT_EQ(q.Push(3), 3) << "a refused item comes back to be answered";
  EXPECT_EQ(q.Pop(), std::nullopt) << "Pop stops at Close";
  EXPECT_EQ(q.Drain(), std::vector<int>({1, 2}));
  EXPECT_TRUE(q.Drain().empty());
}

TEST(WorkQueueTest, FinishAfterCloseServesWhatWasQueued) {
  WorkQueue<int> q;
  EXPECT_FALSE(q.Push(1).has_value());
  q.Close();
  EXPECT_EQ(q.Pop(/*finish_after_close=*/true), 1);
  EXPECT_EQ(q.Pop(/*finish_after_close=*/true), std::nullopt);
}

TEST(WorkQueueTest, AWaitingConsumerGetsEveryItemAndWakesOnClose) {
  WorkQueue<int> q;
  std::vector<int> got;
  std::thread consumer([&] {
    while (std::optional<int> item = q.Pop()) got.push_back(*item);
  });
  constexpr int kItems = 1000;
  for (int i = 0; i < kItems; ++i) ASSERT_FALSE(q.Push(i).has_value());
  // Close only once everything was taken, so that none is left to Drain.
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (q.size() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  q.Close();
  consumer.join();
  std::vector<int> left = q.Drain();
  got.insert(got.end(), left.begin(), left.end());
  ASSERT_EQ(got.size(), static_cast<size_t>(kItems));
  for (int i = 0; i < kItems; ++i) EXPECT_EQ(got[i], i);
}

TEST(WorkQueueTest, PopUntilGivesUpAtItsDeadline) {
  WorkQueue<int> q;
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(q.PopUntil(start + std::chrono::milliseconds(20)), std::nullopt);
  EXPECT_GE(std::chrono::steady_clock::now() - start,
            std::chrono::milliseconds(20));
  EXPECT_FALSE(q.Push(7).has_value());
  EXPECT_EQ(q.PopUntil(start + std::chrono::seconds(30)), 7);
}

TEST(WorkQueueTest, InterruptEndsOnePopUntilEarly) {
  WorkQueue<int> q;
  const auto far = std::chrono::steady_clock::now() + std::chrono::hours(1);
  // Interrupted while waiting: it returns without an item, long before its
  // deadline.
  std::thread interrupter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    q.Interrupt();
  });
  EXPECT_EQ(q.PopUntil(far), std::nullopt);
  interrupter.join();
  // Interrupted before: the next PopUntil returns at once, the one after
  // waits again.
  q.Interrupt();
  EXPECT_EQ(q.PopUntil(far), std::nullopt);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(q.PopUntil(start + std::chrono::milliseconds(20)), std::nullopt);
  EXPECT_GE(std::chrono::steady_clock::now() - start,
            std::chrono::milliseconds(20));
  // An item queued wins over an interrupt.
  q.Interrupt();
  EXPECT_FALSE(q.Push(3).has_value());
  EXPECT_EQ(q.PopUntil(far), 3);
}

}  // namespace
}  // namespace switchyard
