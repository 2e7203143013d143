// The background I/O threads: results come back, and a task never waits
// behind a busy thread (a read-ahead must not queue behind another
// shard's write).
#include "storage/background_io.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <vector>

namespace switchyard::storage {
namespace {

using std::chrono::seconds;

TEST(BackgroundIoTest, ResultsComeBack) {
  std::vector<std::future<int>> results;
  for (int i = 0; i < 50; ++i) {
    results.push_back(InBackground([i] { return i * i; }));
  }
  for (int i = 0; i < 50; ++i) EXPECT_EQ(results[i].get(), i * i);
}

TEST(BackgroundIoTest, ATaskDoesNotWaitBehindABusyThread) {
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::vector<std::future<void>> blocked;
  for (int i = 0; i < 3; ++i) {
    blocked.push_back(InBackground([released] { released.wait(); }));
  }
  // Every thread so far is busy; this one runs anyway.
  std::future<int> free = InBackground([] { return 7; });
  ASSERT_EQ(free.wait_for(seconds(10)), std::future_status::ready);
  EXPECT_EQ(free.get(), 7);
  release.set_value();
  for (auto& b : blocked) {
    EXPECT_EQ(b.wait_for(seconds(10)), std::future_status::ready);
  }
}

}  // namespace
}  // namespace switchyard::storage
