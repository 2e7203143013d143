// PendingRequests without UCX: ids, completion exactly once, a tensor to
// receive into handed over once, expiry in deadline order, failing a channel's
// or every request, and a callback that changes the table while it runs.
#include "transport/ucx/pending_requests.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

namespace switchyard::transport {
namespace {

using Clock = PendingRequests::Clock;
using Ms = std::chrono::milliseconds;

const Clock::time_point kT0 = Clock::time_point() + std::chrono::hours(1);

// Every callback's outcome, in the order they ran.
struct Outcomes {
  struct Outcome {
    std::string tag;
    StatusCode code;
    std::string message;
    int64_t step = -1;  // The response's header.step when OK.
  };
  std::vector<Outcome> ran;

  ResponseCallback For(const std::string& tag) {
    return [this, tag](StatusOr<Message> r) {
      ran.push_back({tag, r.status().code(), r.status().message(),
                     r.ok() ? r->header.step : -1});
    };
  }
  std::vector<std::string> Tags() const {
    std::vector<std::string> tags;
    for (const Outcome& o : ran) tags.push_back(o.tag);
    return tags;
  }
};

Message Response(int64_t step) {
  Message m;
  m.header.step = step;
  return m;
}

int kChannelA, kChannelB;  // Addresses only: opaque channel keys.

TEST(PendingRequestsTest, CompleteRunsTheCallbackOnceWithTheResult) {
  PendingRequests table;
  Outcomes out;
  const uint64_t id = table.Add(out.For("a"), kT0 + Ms(100), &kChannelA, "p:1");
  EXPECT_NE(id, 0u);
  EXPECT_EQ(table.size(), 1u);
  ASSERT_NE(table.Find(id), nullptr);
  EXPECT_EQ(*table.Find(id), "p:1");

  EXPECT_TRUE(table.Complete(id, Response(42)));
  ASSERT_EQ(out.ran.size(), 1u);
  EXPECT_EQ(out.ran[0].code, StatusCode::kOk);
  EXPECT_EQ(out.ran[0].step, 42);
  EXPECT_EQ(table.size(), 0u);
  EXPECT_EQ(table.Find(id), nullptr);

  // A second answer (a duplicate) finds nothing and runs nothing.
  EXPECT_FALSE(table.Complete(id, Response(43)));
  EXPECT_FALSE(table.Complete(id, NotFoundError("again")));
  EXPECT_EQ(out.ran.size(), 1u);
}

TEST(PendingRequestsTest, ATensorToReceiveIntoIsHandedOverOnce) {
  PendingRequests table;
  Outcomes out;
  const Tensor into = Tensor::Zeros(DType::kF32, {8}).value();
  const uint64_t id =
      table.Add(out.For("a"), kT0 + Ms(100), &kChannelA, "p:1", into);
  const uint64_t plain =
      table.Add(out.For("b"), kT0 + Ms(100), &kChannelA, "p:1");
  EXPECT_TRUE(table.TakeReceiveInto(plain).empty());
  const Tensor got = table.TakeReceiveInto(id);
  EXPECT_EQ(got.data(), into.data());
  EXPECT_TRUE(table.TakeReceiveInto(id).empty());  // Once.
  // A slot reused by a later request does not keep an earlier tensor.
  EXPECT_TRUE(table.Complete(id, Response(1)));
  EXPECT_TRUE(table.TakeReceiveInto(id).empty());
  const uint64_t next =
      table.Add(out.For("c"), kT0 + Ms(100), &kChannelA, "p:1");
  EXPECT_TRUE(table.TakeReceiveInto(next).empty());
}

TEST(PendingRequestsTest, UnknownIdsFindNothing) {
  PendingRequests table;
  Outcomes out;
  const uint64_t id = table.Add(out.For("a"), kT0, &kChannelA, "p:1");
  const uint64_t slot = id & 0xffffffffu;
  const uint64_t sequence = id >> 32;
  const struct {
    const char* what;
    uint64_t id;
  } cases[] = {
      {"zero", 0},
      {"the slot with another sequence", ((sequence + 1) << 32) | slot},
      {"an earlier sequence in the slot", ((sequence - 1) << 32) | slot},
      {"a slot never used", (sequence << 32) | (slot + 1)},
      {"a huge slot", (sequence << 32) | 0xfffffffeu},
      {"all ones", ~uint64_t{0}},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(table.Find(c.id), nullptr) << c.what;
    EXPECT_FALSE(table.Complete(c.id, Response(1))) << c.what;
  }
  EXPECT_TRUE(out.ran.empty());
  EXPECT_EQ(table.size(), 1u);
}

TEST(PendingRequestsTest, IdsAreNeverReusedThoughSlotsAre) {
  // A late answer to a finished request must not complete the request
  // that took its slot.
  PendingRequests table;
  Outcomes out;
  const uint64_t first = table.Add(out.For("first"), kT0, &kChannelA, "p:1");
  ASSERT_TRUE(table.Complete(first, Response(1)));
  const uint64_t second = table.Add(out.For("second"), kT0, &kChannelA, "p:1");
  EXPECT_NE(second, first);
  EXPECT_EQ(second & 0xffffffffu, first & 0xffffffffu) << "slot not reused";
  EXPECT_FALSE(table.Complete(first, Response(2)));  // The late answer.
  EXPECT_EQ(out.Tags(), std::vector<std::string>({"first"}));
  EXPECT_TRUE(table.Complete(second, Response(3)));
  EXPECT_EQ(out.Tags(), std::vector<std::string>({"first", "second"}));
  EXPECT_EQ(out.ran[1].step, 3);
}

TEST(PendingRequestsTest, ManyIdsAreDistinctAndSlotsStayFew) {
  PendingRequests table;
  Outcomes out;
  std::map<uint64_t, int> seen;
  std::vector<uint64_t> live;
  for (int round = 0; round < 100; ++round) {
    for (int i = 0; i < 5; ++i) {
      const uint64_t id = table.Add(out.For("x"), kT0, &kChannelA, "p");
      EXPECT_EQ(seen[id]++, 0) << "id " << id << " issued twice";
      EXPECT_LT(id & 0xffffffffu, 5u) << "a slot beyond the 5 in use";
      live.push_back(id);
    }
    for (uint64_t id : live) EXPECT_TRUE(table.Complete(id, Response(0)));
    live.clear();
  }
  EXPECT_EQ(out.ran.size(), 500u);
  EXPECT_EQ(table.size(), 0u);
}

TEST(PendingRequestsTest, ExpiresDueRequestsInDeadlineOrder) {
  struct Request {
    const char* tag;
    int deadline_ms;
  };
  const std::vector<Request> requests = {
      {"c", 300}, {"a", 100}, {"e", 500}, {"b", 200}, {"d", 300}, {"f", 900},
  };
  // At each time: the tags expiring then, in order (ties in any order).
  const struct {
    int now_ms;
    std::vector<std::vector<std::string>> expired;
  } steps[] = {
      {50, {}},
      {100, {{"a"}}},  // A deadline at `now` is due.
      {150, {}},       // Nothing twice.
      {350, {{"b"}, {"c", "d"}}},
      {899, {{"e"}}},
      {10000, {{"f"}}},
      {20000, {}},
  };
  PendingRequests table;
  Outcomes out;
  for (const Request& r : requests) {
    table.Add(out.For(r.tag), kT0 + Ms(r.deadline_ms), &kChannelA,
              std::string("peer-") + r.tag);
  }
  size_t left = requests.size();
  for (const auto& step : steps) {
    out.ran.clear();
    size_t want = 0;
    for (const auto& group : step.expired) want += group.size();
    EXPECT_EQ(table.ExpireDue(kT0 + Ms(step.now_ms)), want) << step.now_ms;
    ASSERT_EQ(out.ran.size(), want) << step.now_ms;
    size_t at = 0;
    for (const auto& group : step.expired) {
      std::vector<std::string> got;
      for (size_t i = 0; i < group.size(); ++i, ++at) {
        got.push_back(out.ran[at].tag);
        EXPECT_EQ(out.ran[at].code, StatusCode::kDeadlineExceeded);
        EXPECT_NE(out.ran[at].message.find("peer-" + out.ran[at].tag),
                  std::string::npos)
            << out.ran[at].message;
      }
      std::sort(got.begin(), got.end());
      EXPECT_EQ(got, group) << "at " << step.now_ms << " ms";
    }
    left -= want;
    EXPECT_EQ(table.size(), left) << step.now_ms;
  }
}

TEST(PendingRequestsTest, AnsweredRequestsDoNotExpire) {
  PendingRequests table;
  Outcomes out;
  const uint64_t a = table.Add(out.For("a"), kT0 + Ms(10), &kChannelA, "p");
  table.Add(out.For("b"), kT0 + Ms(20), &kChannelA, "p");
  ASSERT_TRUE(table.Complete(a, Response(7)));
  // a's heap entry is stale: NextDeadline may still show it (waking a
  // sleeper early), but it expires nothing.
  EXPECT_EQ(table.NextDeadline(), kT0 + Ms(10));
  EXPECT_EQ(table.ExpireDue(kT0 + Ms(15)), 0u);
  EXPECT_EQ(table.NextDeadline(), kT0 + Ms(20));
  EXPECT_EQ(table.ExpireDue(kT0 + Ms(20)), 1u);
  EXPECT_EQ(out.Tags(), std::vector<std::string>({"a", "b"}));
  EXPECT_EQ(out.ran[0].code, StatusCode::kOk);
  EXPECT_EQ(out.ran[1].code, StatusCode::kDeadlineExceeded);
  EXPECT_EQ(table.NextDeadline(), Clock::time_point::max());
}

TEST(PendingRequestsTest, StaleDeadlinesAreDroppedAndOrderKept) {
  // One long-lived request among thousands answered ones: the heap keeps
  // about twice the live entries (plus 64), not one per request ever
  // sent, and three short deadlines still expire in order.
  PendingRequests table;
  Outcomes out;
  table.Add(out.For("long"), kT0 + Ms(60000), &kChannelA, "p");
  for (int i = 0; i < 5000; ++i) {
    const uint64_t id =
        table.Add(out.For("answered"), kT0 + Ms(1000 + i), &kChannelA, "p");
    EXPECT_LE(table.deadline_entries(), 2 * table.size() + 64) << i;
    ASSERT_TRUE(table.Complete(id, Response(i)));
  }
  table.Add(out.For("3"), kT0 + Ms(900), &kChannelA, "p");
  table.Add(out.For("1"), kT0 + Ms(300), &kChannelA, "p");
  table.Add(out.For("2"), kT0 + Ms(600), &kChannelA, "p");
  out.ran.clear();
  EXPECT_EQ(table.ExpireDue(kT0 + Ms(50000)), 3u);
  EXPECT_EQ(out.Tags(), std::vector<std::string>({"1", "2", "3"}));
  EXPECT_EQ(table.size(), 1u);  // The long one.
  EXPECT_EQ(table.ExpireDue(kT0 + Ms(60000)), 1u);
  EXPECT_EQ(out.ran.back().tag, "long");
}

TEST(PendingRequestsTest, NextDeadlineIsTheEarliest) {
  PendingRequests table;
  Outcomes out;
  EXPECT_EQ(table.NextDeadline(), Clock::time_point::max());
  for (int ms : {700, 200, 900, 400}) {
    table.Add(out.For("x"), kT0 + Ms(ms), &kChannelA, "p");
  }
  EXPECT_EQ(table.NextDeadline(), kT0 + Ms(200));
  table.ExpireDue(kT0 + Ms(450));
  EXPECT_EQ(table.NextDeadline(), kT0 + Ms(700));
}

TEST(PendingRequestsTest, IdsOnAChannelAreThatChannelsPendingOnes) {
  PendingRequests table;
  Outcomes out;
  const uint64_t a1 = table.Add(out.For("a1"), kT0, &kChannelA, "a");
  const uint64_t b1 = table.Add(out.For("b1"), kT0, &kChannelB, "b");
  const uint64_t a2 = table.Add(out.For("a2"), kT0, &kChannelA, "a");
  const uint64_t a3 = table.Add(out.For("a3"), kT0, &kChannelA, "a");
  ASSERT_TRUE(table.Complete(a2, Response(0)));
  EXPECT_EQ(table.IdsOn(&kChannelA), std::vector<uint64_t>({a1, a3}));
  EXPECT_EQ(table.IdsOn(&kChannelB), std::vector<uint64_t>({b1}));
  EXPECT_TRUE(table.IdsOn(nullptr).empty());
  // A slot freed and taken again belongs to its new request's channel.
  const uint64_t b2 = table.Add(out.For("b2"), kT0, &kChannelB, "b");
  EXPECT_EQ(b2 & 0xffffffffu, a2 & 0xffffffffu);
  EXPECT_EQ(table.IdsOn(&kChannelA), std::vector<uint64_t>({a1, a3}));
  EXPECT_EQ(table.IdsOn(&kChannelB), std::vector<uint64_t>({b1, b2}));
}

TEST(PendingRequestsTest, FailAllCancelsEveryRequestOnce) {
  // As at shutdown: every pending request fails with the status given,
  // answered ones are not run again, and nothing is left to expire.
  PendingRequests table;
  Outcomes out;
  const uint64_t a = table.Add(out.For("a"), kT0 + Ms(1), &kChannelA, "p");
  table.Add(out.For("b"), kT0 + Ms(2), &kChannelB, "p");
  table.Add(out.For("c"), kT0 + Ms(3), &kChannelA, "p");
  ASSERT_TRUE(table.Complete(a, Response(0)));
  out.ran.clear();
  EXPECT_EQ(table.FailAll(CancelledError("shutting down")), 2u);
  EXPECT_EQ(out.Tags(), std::vector<std::string>({"b", "c"}));
  for (const auto& o : out.ran) {
    EXPECT_EQ(o.code, StatusCode::kCancelled);
    EXPECT_EQ(o.message, "shutting down");
  }
  EXPECT_EQ(table.size(), 0u);
  EXPECT_EQ(table.deadline_entries(), 0u);
  EXPECT_EQ(table.NextDeadline(), Clock::time_point::max());
  EXPECT_EQ(table.ExpireDue(Clock::time_point::max()), 0u);
  EXPECT_EQ(table.FailAll(CancelledError("again")), 0u);
  EXPECT_EQ(out.ran.size(), 2u);
}

TEST(PendingRequestsTest, ACallbackRunsAfterItsRequestLeftAndMayAddMore) {
  // Callbacks run with the table consistent: their own request gone, and
  // free to send again (a retry) while an expiry sweep is under way.
  PendingRequests table;
  std::vector<std::string> log;
  uint64_t retry = 0;
  uint64_t first = 0;
  first = table.Add(
      [&](StatusOr<Message> r) {
        log.push_back("first " +
                      std::string(StatusCodeName(r.status().code())));
        EXPECT_EQ(table.Find(first), nullptr);
        EXPECT_EQ(table.size(), 1u);  // "second" only.
        retry = table.Add(
            [&](StatusOr<Message> r2) {
              log.push_back("retry " +
                            std::string(StatusCodeName(r2.status().code())));
            },
            kT0 + Ms(50), &kChannelA, "p");
      },
      kT0 + Ms(10), &kChannelA, "p");
  table.Add(
      [&](StatusOr<Message> r) {
        log.push_back("second " +
                      std::string(StatusCodeName(r.status().code())));
      },
      kT0 + Ms(20), &kChannelA, "p");
  // The sweep to 100 ms expires first, then second, then the retry the
  // first's callback added (its deadline, 50 ms, is due too).
  EXPECT_EQ(table.ExpireDue(kT0 + Ms(100)), 3u);
  ASSERT_EQ(log.size(), 3u);
  EXPECT_EQ(log[0].rfind("first ", 0), 0u);
  EXPECT_EQ(log[1].rfind("second ", 0), 0u);
  EXPECT_EQ(log[2].rfind("retry ", 0), 0u);
  EXPECT_NE(retry, 0u);
  EXPECT_EQ(table.size(), 0u);
}

}  // namespace
}  // namespace switchyard::transport
