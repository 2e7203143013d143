// Placement properties over many random cluster shapes.
#include "coordinator/placement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "common/config.h"

namespace switchyard::coordinator {
namespace {

struct Shape {
  std::vector<ShardFootprint> shards;
  int num_workers = 0;
};

Shape RandomShape(std::mt19937& rng) {
  auto pick = [&rng](int lo, int hi) {
    return std::uniform_int_distribution<int>(lo, hi)(rng);
  };
  const int shards_per_expert = 1 << pick(0, 2);
  std::vector<std::string> overrides = {
      "model.num_layers=" + std::to_string(2 * pick(1, 3)),
      "model.num_experts=" + std::to_string(pick(1, 16)),
      "model.shards_per_expert=" + std::to_string(shards_per_expert),
      "model.d_ff=" + std::to_string(shards_per_expert * 16 * pick(1, 8)),
      "model.dense_shards=" + std::to_string(pick(1, 6)),
      "model.activation=" + std::string(pick(0, 1) ? "swiglu" : "gelu"),
  };
  auto loaded = ParseConfig("", "random", overrides);
  CHECK(loaded.ok()) << loaded.status().ToString();
  return {ModelShards(loaded->config), pick(1, 24)};
}

std::vector<WorkerSlot> Workers(int n, int64_t capacity, int first = 0) {
  std::vector<WorkerSlot> workers;
  for (int w = first; w < first + n; ++w) {
    char name[16];
    std::snprintf(name, sizeof(name), "w%03d", w);
    workers.push_back({name, capacity});
  }
  return workers;
}

std::vector<int64_t> Loads(const PlacementInput& in, const PlacementResult& r) {
  std::vector<int64_t> load(in.workers.size(), 0);
  for (size_t i = 0; i < in.shards.size(); ++i) {
    if (r.worker_of_shard[i] >= 0)
      load[r.worker_of_shard[i]] += in.shards[i].bytes;
  }
  return load;
}

int64_t MaxShardBytes(const std::vector<ShardFootprint>& shards) {
  int64_t m = 0;
  for (const auto& s : shards) m = std::max(m, s.bytes);
  return m;
}

std::unordered_map<ShardId, std::string, ShardIdHash> AsPrevious(
    const PlacementInput& in, const PlacementResult& r) {
  std::unordered_map<ShardId, std::string, ShardIdHash> previous;
  for (size_t i = 0; i < in.shards.size(); ++i) {
    if (r.worker_of_shard[i] >= 0) {
      previous[in.shards[i].id] = in.workers[r.worker_of_shard[i]].name;
    }
  }
  return previous;
}

constexpr int64_t kHuge = int64_t{1} << 50;

TEST(PlacementTest, FreshPlacementIsBalancedAndDeterministic) {
  std::mt19937 rng(1);
  for (int trial = 0; trial < 200; ++trial) {
    Shape shape = RandomShape(rng);
    PlacementInput in;
    in.shards = shape.shards;
    in.workers = Workers(shape.num_workers, kHuge);
    const PlacementResult r = ComputePlacement(in);
    ASSERT_TRUE(r.status.ok());
    EXPECT_EQ(r.num_unplaced, 0);
    EXPECT_EQ(r.num_moved, 0);
    const auto load = Loads(in, r);
    const auto [lo, hi] = std::minmax_element(load.begin(), load.end());
    EXPECT_LE(*hi - *lo, MaxShardBytes(in.shards)) << "trial " << trial;
    const PlacementResult again = ComputePlacement(in);
    EXPECT_EQ(again.worker_of_shard, r.worker_of_shard) << "trial " << trial;
  }
}

TEST(PlacementTest, CapacityIsNeverExceeded) {
  std::mt19937 rng(2);
  for (int trial = 0; trial < 200; ++trial) {
    Shape shape = RandomShape(rng);
    int64_t total = 0;
    for (const auto& s : shape.shards) total += s.bytes;
    // Capacities from 30% to 200% of an even share: some shapes cannot fit.
    const double factor = std::uniform_real_distribution<double>(0.3, 2.0)(rng);
    const int64_t capacity = std::max<int64_t>(
        1, static_cast<int64_t>(factor * total / shape.num_workers));
    PlacementInput in;
    in.shards = shape.shards;
    in.workers = Workers(shape.num_workers, capacity);
    const PlacementResult r = ComputePlacement(in);
    for (int64_t load : Loads(in, r)) EXPECT_LE(load, capacity);
    if (r.num_unplaced > 0) {
      EXPECT_EQ(r.status.code(), StatusCode::kResourceExhausted);
      EXPECT_NE(r.status.message().find(
                    "cannot place " + std::to_string(r.num_unplaced) + " of " +
                    std::to_string(in.shards.size())),
                std::string::npos)
          << r.status.message();
    } else {
      EXPECT_TRUE(r.status.ok());
    }
    if (capacity * shape.num_workers < total) {
      EXPECT_GT(r.num_unplaced, 0);
    }
  }
}

TEST(PlacementTest, JoinMovesShardsOnlyOntoTheNewWorker) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 200; ++trial) {
    Shape shape = RandomShape(rng);
    PlacementInput before;
    before.shards = shape.shards;
    before.workers = Workers(shape.num_workers, kHuge);
    const PlacementResult r0 = ComputePlacement(before);

    PlacementInput after = before;
    after.previous = AsPrevious(before, r0);
    after.workers = Workers(shape.num_workers + 1, kHuge);  // w<N> joins.
    const PlacementResult r1 = ComputePlacement(after);
    ASSERT_TRUE(r1.status.ok());
    const int joiner = shape.num_workers;
    int moved_to_joiner = 0;
    for (size_t i = 0; i < after.shards.size(); ++i) {
      const int w0 = r0.worker_of_shard[i], w1 = r1.worker_of_shard[i];
      if (w0 != w1) {
        EXPECT_EQ(w1, joiner) << "trial " << trial << ": a shard moved "
                              << "between two old workers";
        ++moved_to_joiner;
      }
    }
    EXPECT_EQ(r1.num_moved, moved_to_joiner);
    const auto load = Loads(after, r1);
    const auto [lo, hi] = std::minmax_element(load.begin(), load.end());
    EXPECT_LE(*hi - *lo, MaxShardBytes(after.shards)) << "trial " << trial;
  }
}

TEST(PlacementTest, LeaveMovesOnlyTheLostShards) {
  std::mt19937 rng(4);
  for (int trial = 0; trial < 200; ++trial) {
    Shape shape = RandomShape(rng);
    if (shape.num_workers < 2) continue;
    PlacementInput before;
    before.shards = shape.shards;
    before.workers = Workers(shape.num_workers, kHuge);
    const PlacementResult r0 = ComputePlacement(before);
    const int dead =
        std::uniform_int_distribution<int>(0, shape.num_workers - 1)(rng);

    PlacementInput after = before;
    after.previous = AsPrevious(before, r0);
    after.workers.erase(after.workers.begin() + dead);
    const PlacementResult r1 = ComputePlacement(after);
    ASSERT_TRUE(r1.status.ok());
    int lost = 0;
    for (size_t i = 0; i < after.shards.size(); ++i) {
      const std::string& old_home = before.workers[r0.worker_of_shard[i]].name;
      const std::string& new_home = after.workers[r1.worker_of_shard[i]].name;
      if (r0.worker_of_shard[i] == dead) {
        ++lost;
      } else {
        EXPECT_EQ(old_home, new_home) << "trial " << trial;
      }
    }
    EXPECT_EQ(r1.num_moved, lost);
    const auto load = Loads(after, r1);
    const auto [lo, hi] = std::minmax_element(load.begin(), load.end());
    EXPECT_LE(*hi - *lo, MaxShardBytes(after.shards)) << "trial " << trial;
  }
}

TEST(PlacementTest, TokenLoadBreaksTiesTowardColdWorkers) {
  auto loaded =
      ParseConfig("", "t", {"model.num_experts=4", "model.dense_shards=1"});
  ASSERT_TRUE(loaded.ok());
  PlacementInput in;
  in.shards = ModelShards(loaded->config);
  // Only the expert shards: equal sizes, so tokens decide the order.
  in.shards.resize(4);
  in.workers = Workers(2, kHuge);
  in.token_load[in.shards[0].id] = 1000;
  in.token_load[in.shards[1].id] = 900;
  in.token_load[in.shards[2].id] = 10;
  in.token_load[in.shards[3].id] = 5;
  const PlacementResult r = ComputePlacement(in);
  // The two hottest experts land on different workers.
  EXPECT_NE(r.worker_of_shard[0], r.worker_of_shard[1]);
}

TEST(PlacementTest, FormatBytes) {
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(1536), "1.50 KiB");
  EXPECT_EQ(FormatBytes(int64_t{3} << 30), "3.00 GiB");
}

}  // namespace
}  // namespace switchyard::coordinator
