// The data plane's adaptive polling rule (NextPollWindow): a sleep that
// traffic ended within one window doubles the window up to its maximum, one
// that timed out or lasted over four windows halves it down to
// transport.busy_poll_us, anything between keeps it.
#include "transport/ucx/progress_driver.h"

#include <gtest/gtest.h>

namespace switchyard::transport {
namespace {

using Us = std::chrono::microseconds;

TEST(NextPollWindowTest, TrafficJustMissedDoublesUpToTheMaximum) {
  EXPECT_EQ(NextPollWindow(50, 50, 1000, /*woken=*/true, Us(20)), 100);
  EXPECT_EQ(NextPollWindow(800, 50, 1000, true, Us(700)), 1000);
  EXPECT_EQ(NextPollWindow(1000, 50, 1000, true, Us(10)), 1000);
}

TEST(NextPollWindowTest, IdleSleepsHalveDownToTheMinimum) {
  EXPECT_EQ(NextPollWindow(1000, 50, 1000, /*woken=*/false, Us(100000)), 500);
  EXPECT_EQ(NextPollWindow(400, 50, 1000, true, Us(1601)), 200);
  EXPECT_EQ(NextPollWindow(60, 50, 1000, false, Us(1000)), 50);
  EXPECT_EQ(NextPollWindow(50, 50, 1000, false, Us(1000)), 50);
}

TEST(NextPollWindowTest, TrafficSoonAfterKeepsTheWindow) {
  EXPECT_EQ(NextPollWindow(200, 50, 1000, true, Us(200)), 200);
  EXPECT_EQ(NextPollWindow(200, 50, 1000, true, Us(800)), 200);
}

TEST(NextPollWindowTest, FixedAndOffStayPut) {
  // max_busy_poll_us at most busy_poll_us: fixed.
  EXPECT_EQ(NextPollWindow(50, 50, 50, true, Us(1)), 50);
  // busy_poll_us 0: the thread sleeps at once, always.
  EXPECT_EQ(NextPollWindow(0, 0, 1000, true, Us(0)), 0);
  EXPECT_EQ(NextPollWindow(0, 0, 1000, false, Us(5)), 0);
}

}  // namespace
}  // namespace switchyard::transport
