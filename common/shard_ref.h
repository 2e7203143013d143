// ShardId <-> control::ShardRef (its wire form in routing tables, loads and
// checkpoint reports): the one conversion.
#ifndef SWITCHYARD_COMMON_SHARD_REF_H_
#define SWITCHYARD_COMMON_SHARD_REF_H_

#include "common/ids.h"
#include "control.pb.h"

namespace switchyard {

inline ShardId FromShardRef(const control::ShardRef& ref) {
  return ref.kind() == control::DENSE
             ? ShardId::Dense(ref.shard())
             : ShardId::Expert(ref.layer(), ref.expert(), ref.shard());
}

inline control::ShardRef ToShardRef(const ShardId& id) {
  control::ShardRef ref;
  ref.set_kind(id.is_expert() ? control::EXPERT : control::DENSE);
  if (id.is_expert()) {
    ref.set_layer(id.layer);
    ref.set_expert(id.expert);
  }
  ref.set_shard(id.shard);
  return ref;
}

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_SHARD_REF_H_
