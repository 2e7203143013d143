#include "common/metrics.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace switchyard {
namespace {

TEST(MetricsTest, CountersAreThreadSafe) {
  MetricsRegistry registry;
  Counter* c = registry.GetCounter("requests_total");
  EXPECT_EQ(registry.GetCounter("requests_total"), c);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([c] {
      for (int i = 0; i < 10000; ++i) c->Increment();
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(c->value(), 40000u);
}

TEST(MetricsTest, HistogramBucketsAndText) {
  MetricsRegistry registry;
  Histogram* h = registry.GetHistogram("latency_ms", {1, 10, 100});
  for (double v : {0.5, 1.0, 5.0, 50.0, 500.0}) h->Observe(v);
  const auto s = h->snapshot();
  EXPECT_EQ(s.cumulative_counts, (std::vector<uint64_t>{2, 3, 4, 5}));
  EXPECT_EQ(s.count, 5u);
  EXPECT_DOUBLE_EQ(s.sum, 556.5);
  registry.GetGauge("queue_bytes")->Set(42);
  const std::string text = registry.RenderText();
  EXPECT_NE(text.find("latency_ms_bucket{le=\"10\"} 3"), std::string::npos);
  EXPECT_NE(text.find("latency_ms_bucket{le=\"+Inf\"} 5"), std::string::npos);
  EXPECT_NE(text.find("queue_bytes 42"), std::string::npos);
  EXPECT_NE(text.find("# TYPE latency_ms histogram"), std::string::npos);
}

// Gauges of one family with labels: one TYPE line naming the family, one
// sample per label set (Prometheus' text format).
TEST(MetricsTest, LabelledGaugesShareOneTypeLine) {
  MetricsRegistry registry;
  registry.GetGauge("replicas{shard=\"L0.E1.S0\"}")->Set(3);
  registry.GetGauge("replicas{shard=\"L0.E2.S0\"}")->Set(1);
  const std::string text = registry.RenderText();
  EXPECT_EQ(text,
            "# TYPE replicas gauge\n"
            "replicas{shard=\"L0.E1.S0\"} 3\n"
            "replicas{shard=\"L0.E2.S0\"} 1\n");
}

}  // namespace
}  // namespace switchyard
