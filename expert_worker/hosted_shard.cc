#include "expert_worker/hosted_shard.h"

#include <cstring>
#include <string>

namespace switchyard::expert_worker {

void AbandonStep(ExpertShard* shard) {
  shard->activations.clear();
  shard->contributions.clear();
  shard->grads_ready = false;
  shard->grads_early = false;
  shard->step_tokens = 0;
}

void AbandonStep(DenseShard* shard) {
  shard->pushes.clear();
  shard->grad = Tensor();
}

Tensor CopyTensor(BufferPool& pool, const Tensor& t, bool deep) {
  if (!deep || t.empty()) return t;
  auto copy = pool.Take(t.dtype(), t.shape());
  if (!copy.ok()) return t.Clone();
  std::memcpy(copy->data(), t.data(), t.num_bytes());
  return std::move(copy).value();
}

namespace {

void AddState(BufferPool& pool, storage::ShardSnapshot* s,
              const std::string& prefix, const OptimizerState& st, bool deep) {
  s->tensors.push_back({prefix + "m", CopyTensor(pool, st.m, deep)});
  s->tensors.push_back({prefix + "v", CopyTensor(pool, st.v, deep)});
  s->tensors.push_back({prefix + "row", CopyTensor(pool, st.row, deep)});
  s->tensors.push_back({prefix + "col", CopyTensor(pool, st.col, deep)});
}

}  // namespace

storage::ShardSnapshot SnapshotOf(const DenseShard& d, BufferPool& pool,
                                  bool deep) {
  storage::ShardSnapshot s;
  s.shard = "D" + std::to_string(d.index);
  s.tensors.push_back({"params", CopyTensor(pool, d.params, deep)});
  AddState(pool, &s, "opt.", d.state, deep);
  return s;
}

storage::ShardSnapshot SnapshotOf(const ExpertShard& shard, BufferPool& pool,
                                  bool deep) {
  storage::ShardSnapshot s;
  s.shard = shard.id.ToString();
  s.tensors.push_back({"w1", CopyTensor(pool, shard.params.w1, deep)});
  s.tensors.push_back({"b1", CopyTensor(pool, shard.params.b1, deep)});
  s.tensors.push_back({"w2", CopyTensor(pool, shard.params.w2, deep)});
  s.tensors.push_back({"b2", CopyTensor(pool, shard.params.b2, deep)});
  AddState(pool, &s, "opt.w1.", shard.w1, deep);
  AddState(pool, &s, "opt.b1.", shard.b1, deep);
  AddState(pool, &s, "opt.w2.", shard.w2, deep);
  AddState(pool, &s, "opt.b2.", shard.b2, deep);
  if (!shard.repl.empty()) {
    s.tensors.push_back({"repl", CopyTensor(pool, shard.repl, deep)});
  }
  return s;
}

}  // namespace switchyard::expert_worker
