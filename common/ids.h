// Identifiers of the units of placement and checkpointing.
//
// An expert shard is (layer, expert, shard): shard s of expert e in MoE layer
// l, a slice of the expert's d_ff. A dense shard is one slice of the dense
// parameters (embeddings, attention, norms, routers), identified by index.
#ifndef SWITCHYARD_COMMON_IDS_H_
#define SWITCHYARD_COMMON_IDS_H_

#include <compare>
#include <cstdint>
#include <functional>
#include <string>

#include "common/status.h"

namespace switchyard {

struct ShardId {
  enum class Kind : uint8_t { kExpert = 1, kDense = 2 };

  Kind kind = Kind::kExpert;
  int32_t layer = 0;   // MoE layer index (expert shards only).
  int32_t expert = 0;  // Expert index within the layer (expert shards only).
  int32_t shard = 0;   // Shard index within the expert, or dense shard index.

  static ShardId Expert(int32_t layer, int32_t expert, int32_t shard) {
    return ShardId{Kind::kExpert, layer, expert, shard};
  }
  static ShardId Dense(int32_t shard) {
    return ShardId{Kind::kDense, 0, 0, shard};
  }

  bool is_expert() const { return kind == Kind::kExpert; }

  // "L3.E17.S0" for experts, "D2" for dense shards.
  std::string ToString() const;
  // Inverse of ToString.
  static StatusOr<ShardId> Parse(const std::string& text);

  auto operator<=>(const ShardId&) const = default;
};

struct ShardIdHash {
  size_t operator()(const ShardId& id) const {
    uint64_t h = static_cast<uint64_t>(id.kind);
    h = h * 0x9E3779B97F4A7C15ull ^ static_cast<uint32_t>(id.layer);
    h = h * 0x9E3779B97F4A7C15ull ^ static_cast<uint32_t>(id.expert);
    h = h * 0x9E3779B97F4A7C15ull ^ static_cast<uint32_t>(id.shard);
    return std::hash<uint64_t>()(h);
  }
};

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_IDS_H_
