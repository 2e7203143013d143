#include "common/metrics.h"

#include <algorithm>
#include <sstream>

namespace switchyard {

Histogram::Histogram(std::vector<double> upper_bounds)
    : upper_bounds_(std::move(upper_bounds)),
      counts_(upper_bounds_.size() + 1, 0) {}

void Histogram::Observe(double value) {
  const size_t bucket =
      std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), value) -
      upper_bounds_.begin();
  MutexLock lock(&mu_);
  ++counts_[bucket];
  ++count_;
  sum_ += value;
}

Histogram::Snapshot Histogram::snapshot() const {
  MutexLock lock(&mu_);
  Snapshot s;
  s.upper_bounds = upper_bounds_;
  uint64_t running = 0;
  for (uint64_t c : counts_) {
    running += c;
    s.cumulative_counts.push_back(running);
  }
  s.count = count_;
  s.sum = sum_;
  return s;
}

MetricsRegistry& MetricsRegistry::Global() {
  static MetricsRegistry* registry = new MetricsRegistry();
  return *registry;
}

Counter* MetricsRegistry::GetCounter(const std::string& name) {
  MutexLock lock(&mu_);
  auto& slot = counters_[name];
  if (!slot) slot = std::make_unique<Counter>();
  return slot.get();
}

Gauge* MetricsRegistry::GetGauge(const std::string& name) {
  MutexLock lock(&mu_);
  auto& slot = gauges_[name];
  if (!slot) slot = std::make_unique<Gauge>();
  return slot.get();
}

Histogram* MetricsRegistry::GetHistogram(
    const std::string& name, const std::vector<double>& upper_bounds) {
  MutexLock lock(&mu_);
  auto& slot = histograms_[name];
  if (!slot) slot = std::make_unique<Histogram>(upper_bounds);
  return slot.get();
}

std::string MetricsRegistry::RenderText() const {
  MutexLock lock(&mu_);
  std::ostringstream out;
  for (const auto& [name, c] : counters_) {
    out << "# TYPE " << name << " counter\n"
        << name << " " << c->value() << "\n";
  }
  // A name may carry labels (name{shard="L0.E1.S0"}): one TYPE line per
  // family (the map keeps a family's names together).
  std::string family;
  for (const auto& [name, g] : gauges_) {
    const std::string base = name.substr(0, name.find('{'));
    if (base != family) out << "# TYPE " << base << " gauge\n";
    family = base;
    out << name << " " << g->value() << "\n";
  }
  for (const auto& [name, h] : histograms_) {
    const Histogram::Snapshot s = h->snapshot();
    out << "# TYPE " << name << " histogram\n";
    for (size_t i = 0; i < s.upper_bounds.size(); ++i) {
      out << name << "_bucket{le=\"" << s.upper_bounds[i] << "\"} "
          << s.cumulative_counts[i] << "\n";
    }
    out << name << "_bucket{le=\"+Inf\"} " << s.cumulative_counts.back() << "\n"
        << name << "_sum " << s.sum << "\n"
        << name << "_count " << s.count << "\n";
  }
  return out.str();
}

std::vector<double> LatencyBucketsMs() {
  return {0.05, 0.1, 0.25, 0.5, 1,    2.5,  5,    10,   25,
          50,   100, 250,  500, 1000, 2500, 5000, 10000};
}

}  // namespace switchyard
