// A small metrics registry: counters, gauges and histograms by name.
//
// Thread-safe. Metric objects are owned by the registry and live as long as
// it does; the pointers returned by Get* stay valid. Updates are lock-free
// (counters, gauges) or take a per-histogram mutex. RenderText() writes the
// Prometheus text exposition format.
#ifndef SWITCHYARD_COMMON_METRICS_H_
#define SWITCHYARD_COMMON_METRICS_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/mutex.h"
#include "common/thread_annotations.h"

namespace switchyard {

class Counter {
 public:
  void Increment(uint64_t delta = 1) {
    value_.fetch_add(delta, std::memory_order_relaxed);
  }
  uint64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> value_{0};
};

// Adds the microseconds its scope lasts to `counter` (a time breakdown:
// switchyard_worker_*_microseconds_total).
class ScopedMicros {
 public:
  explicit ScopedMicros(Counter* counter)
      : counter_(counter), start_(std::chrono::steady_clock::now()) {}
  ~ScopedMicros() {
    counter_->Increment(static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::microseconds>(
            std::chrono::steady_clock::now() - start_)
            .count()));
  }
  ScopedMicros(const ScopedMicros&) = delete;
  ScopedMicros& operator=(const ScopedMicros&) = delete;

 private:
  Counter* const counter_;
  const std::chrono::steady_clock::time_point start_;
};

class Gauge {
 public:
  void Set(double value) { value_.store(value, std::memory_order_relaxed); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

// Cumulative histogram over fixed upper bounds (plus +Inf).
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void Observe(double value) EXCLUDES(mu_);

  struct Snapshot {
    std::vector<double> upper_bounds;
    std::vector<uint64_t> cumulative_counts;  // One per bound, then +Inf.
    uint64_t count = 0;
    double sum = 0;
  };
  Snapshot snapshot() const EXCLUDES(mu_);

 private:
  const std::vector<double> upper_bounds_;
  mutable Mutex mu_;
  std::vector<uint64_t> counts_ GUARDED_BY(mu_);  // Per bucket, not cumulative.
  uint64_t count_ GUARDED_BY(mu_) = 0;
  double sum_ GUARDED_BY(mu_) = 0;
};

class MetricsRegistry {
 public:
  // The process-wide registry.
  static MetricsRegistry& Global();

  // Returns the metric named `name` (a gauge's may carry labels:
  // name{shard="L0.E1.S0"}), creating it on first use. A histogram's
  // bounds are fixed by its first Get.
  Counter* GetCounter(const std::string& name) EXCLUDES(mu_);
  Gauge* GetGauge(const std::string& name) EXCLUDES(mu_);
  Histogram* GetHistogram(const std::string& name,
                          const std::vector<double>& upper_bounds)
      EXCLUDES(mu_);

  std::string RenderText() const EXCLUDES(mu_);

 private:
  mutable Mutex mu_;
  std::map<std::string, std::unique_ptr<Counter>> counters_ GUARDED_BY(mu_);
  std::map<std::string, std::unique_ptr<Gauge>> gauges_ GUARDED_BY(mu_);
  std::map<std::string, std::unique_ptr<Histogram>> histograms_ GUARDED_BY(mu_);
};

// Latency bounds in milliseconds, 0.05 ms to 10 s.
std::vector<double> LatencyBucketsMs();

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_METRICS_H_
