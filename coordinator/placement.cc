#include "coordinator/placement.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <set>
#include <tuple>

namespace switchyard::coordinator {

std::string FormatBytes(int64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (std::abs(value) >= 1024 && unit < 5) {
    value /= 1024;
    ++unit;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), unit == 0 ? "%.0f %s" : "%.2f %s", value,
                kUnits[unit]);
  return buf;
}

PlacementResult ComputePlacement(const PlacementInput& input) {
  const int num_workers = static_cast<int>(input.workers.size());
  const int num_shards = static_cast<int>(input.shards.size());
  PlacementResult result;
  result.worker_of_shard.assign(num_shards, -1);

  std::unordered_map<std::string, int> worker_index;
  for (int w = 0; w < num_workers; ++w) {
    worker_index.emplace(input.workers[w].name, w);
  }
  std::vector<int64_t> load(num_workers, 0);
  std::vector<uint64_t> tokens(num_workers, 0);
  std::vector<int> previous_worker(num_shards, -1);
  std::vector<bool> held_before(num_workers, false);
  auto shard_tokens = [&](int i) -> uint64_t {
    auto it = input.token_load.find(input.shards[i].id);
    return it == input.token_load.end() ? 0 : it->second;
  };

  // 1. Sticky.
  bool any_previous = false;
  std::vector<int> orphans;
  for (int i = 0; i < num_shards; ++i) {
    const ShardFootprint& shard = input.shards[i];
    auto prev = input.previous.find(shard.id);
    if (prev != input.previous.end()) {
      any_previous = true;
      auto w = worker_index.find(prev->second);
      if (w != worker_index.end()) {
        previous_worker[i] = w->second;
        held_before[w->second] = true;
        if (load[w->second] + shard.bytes <=
            input.workers[w->second].capacity_bytes) {
          result.worker_of_shard[i] = w->second;
          load[w->second] += shard.bytes;
          tokens[w->second] += shard_tokens(i);
          continue;
        }
      }
    }
    orphans.push_back(i);
  }

  // 2. Orphans, largest first, onto the least-loaded worker with room.
  std::sort(orphans.begin(), orphans.end(), [&](int a, int b) {
    const auto& sa = input.shards[a];
    const auto& sb = input.shards[b];
    return std::make_tuple(-sa.bytes, -static_cast<int64_t>(shard_tokens(a)),
                           sa.id) <
           std::make_tuple(-sb.bytes, -static_cast<int64_t>(shard_tokens(b)),
                           sb.id);
  });
  using Key = std::tuple<int64_t, uint64_t, int>;  // (bytes, tokens, worker)
  std::set<Key> by_load;
  for (int w = 0; w < num_workers; ++w) by_load.insert({load[w], tokens[w], w});
  int64_t unplaced_bytes = 0;
  for (int i : orphans) {
    const int64_t bytes = input.shards[i].bytes;
    int chosen = -1;
    for (const Key& key : by_load) {
      const int w = std::get<2>(key);
      if (load[w] + bytes <= input.workers[w].capacity_bytes) {
        chosen = w;
        break;
      }
    }
    if (chosen < 0) {
      ++result.num_unplaced;
      unplaced_bytes += bytes;
      continue;
    }
    by_load.erase({load[chosen], tokens[chosen], chosen});
    load[chosen] += bytes;
    tokens[chosen] += shard_tokens(i);
    by_load.insert({load[chosen], tokens[chosen], chosen});
    result.worker_of_shard[i] = chosen;
  }

  // 3. Joiners pull shards from the fullest worker while that narrows the gap.
  if (any_previous) {
    std::set<std::pair<int64_t, int>> joiners;  // (load, worker)
    for (int w = 0; w < num_workers; ++w) {
      if (!held_before[w]) joiners.insert({load[w], w});
    }
    if (!joiners.empty()) {
      // Per worker: its shards ordered by (bytes, shard index).
      std::vector<std::set<std::pair<int64_t, int>>> held(num_workers);
      for (int i = 0; i < num_shards; ++i) {
        if (result.worker_of_shard[i] >= 0) {
          held[result.worker_of_shard[i]].insert({input.shards[i].bytes, i});
        }
      }
      std::set<std::pair<int64_t, int>> all;  // (load, worker)
      for (int w = 0; w < num_workers; ++w) all.insert({load[w], w});
      while (true) {
        const int hi = std::prev(all.end())->second;
        const int lo = joiners.begin()->second;
        const int64_t gap = load[hi] - load[lo];
        // The largest shard on `hi` that narrows the gap and fits on `lo`.
        auto& shards = held[hi];
        auto it = shards.lower_bound({gap, -1});
        int pick = -1;
        while (it != shards.begin()) {
          --it;
          if (load[lo] + it->first <= input.workers[lo].capacity_bytes) {
            pick = it->second;
            break;
          }
        }
        if (pick < 0 || hi == lo) break;
        const int64_t bytes = input.shards[pick].bytes;
        all.erase({load[hi], hi});
        all.erase({load[lo], lo});
        joiners.erase({load[lo], lo});
        if (!held_before[hi]) joiners.erase({load[hi], hi});
        shards.erase({bytes, pick});
        held[lo].insert({bytes, pick});
        load[hi] -= bytes;
        load[lo] += bytes;
        result.worker_of_shard[pick] = lo;
        all.insert({load[hi], hi});
        all.insert({load[lo], lo});
        joiners.insert({load[lo], lo});
        if (!held_before[hi]) joiners.insert({load[hi], hi});
      }
    }
  }

  for (int i = 0; i < num_shards; ++i) {
    if (previous_worker[i] >= 0 && result.worker_of_shard[i] >= 0 &&
        result.worker_of_shard[i] != previous_worker[i]) {
      ++result.num_moved;
    } else if (previous_worker[i] < 0 &&
               input.previous.count(input.shards[i].id) &&
               result.worker_of_shard[i] >= 0) {
      ++result.num_moved;  // Moved off a worker that is gone.
    }
  }

  if (result.num_unplaced > 0) {
    int64_t total = 0, capacity = 0;
    for (const auto& s : input.shards) total += s.bytes;
    for (const auto& w : input.workers) capacity += w.capacity_bytes;
    result.status = ResourceExhaustedError(
        "cannot place " + std::to_string(result.num_unplaced) + " of " +
        std::to_string(num_shards) + " shards (" + FormatBytes(unplaced_bytes) +
        "): the model needs " + FormatBytes(total) + " and the " +
        std::to_string(num_workers) + " live workers offer " +
        FormatBytes(capacity) + " in all; add workers or capacity");
  }
  return result;
}

}  // namespace switchyard::coordinator
