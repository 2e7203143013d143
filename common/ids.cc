#include "common/ids.h"

#include <cstdio>

namespace switchyard {

std::string ShardId::ToString() const {
  if (kind == Kind::kDense) return "D" + std::to_string(shard);
  return "L" + std::to_string(layer) + ".E" + std::to_string(expert) + ".S" +
         std::to_string(shard);
}

StatusOr<ShardId> ShardId::Parse(const std::string& text) {
  int layer = 0, expert = 0, shard = 0, consumed = 0;
  if (std::sscanf(text.c_str(), "D%d%n", &shard, &consumed) == 1 &&
      consumed == static_cast<int>(text.size()) && shard >= 0) {
    return ShardId::Dense(shard);
  }
  if (std::sscanf(text.c_str(), "L%d.E%d.S%d%n", &layer, &expert, &shard,
                  &consumed) == 3 &&
      consumed == static_cast<int>(text.size()) && layer >= 0 && expert >= 0 &&
      shard >= 0) {
    return ShardId::Expert(layer, expert, shard);
  }
  return InvalidArgumentError("malformed shard id '" + text +
                              "' (expected L<layer>.E<expert>.S<shard> or "
                              "D<shard>)");
}

}  // namespace switchyard
