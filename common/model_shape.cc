#include "common/model_shape.h"

namespace switchyard {
namespace {

// Optimizer-state bytes for one matrix (rows, cols) or vector (rows, 1).
int64_t OptimizerStateBytes(const std::string& optimizer, int64_t rows,
                            int64_t cols) {
  if (optimizer == "adafactor" && cols > 1) return 4 * (rows + cols);
  return 2 * 4 * rows * cols;  // Two fp32 moments.
}

// Parameters + gradient accumulator (fp32 each) + optimizer state.
int64_t TensorBytes(const std::string& optimizer, int64_t rows, int64_t cols) {
  return 2 * 4 * rows * cols + OptimizerStateBytes(optimizer, rows, cols);
}

}  // namespace

int NumMoeLayers(const config::ModelConfig& model) {
  return model.num_layers() / model.moe_every();
}

bool IsMoeLayer(const config::ModelConfig& model, int layer) {
  return (layer + 1) % model.moe_every() == 0;
}

int64_t ExpertShardParams(const config::ModelConfig& m, int shard) {
  const int64_t d = m.d_model();
  const int64_t f = m.d_ff() / m.shards_per_expert();
  const int64_t gates = m.activation() == "swiglu" ? 2 : 1;
  int64_t params = gates * d * f + f * d;
  if (m.expert_bias()) params += gates * f + (shard == 0 ? d : 0);
  return params;
}

int64_t DenseParams(const config::ModelConfig& m) {
  const int64_t d = m.d_model();
  const int64_t norm = m.norm() == "layernorm" ? 2 * d : d;
  int64_t params = m.vocab_size() * d;  // Token embedding.
  if (m.positions() == "learned") params += m.seq_len() * d;
  for (int layer = 0; layer < m.num_layers(); ++layer) {
    params += 4 * d * d + 2 * norm;  // Q, K, V, O and two pre-norms.
    if (IsMoeLayer(m, layer)) {
      params += d * m.num_experts();  // Router.
    } else {
      const int64_t gates = m.activation() == "swiglu" ? 2 : 1;
      params += gates * d * m.d_ff() + m.d_ff() * d;
      if (m.expert_bias()) params += gates * m.d_ff() + d;
    }
  }
  params += norm + m.vocab_size() * d;  // Final norm, LM head.
  return params;
}

std::vector<ShardFootprint> ModelShards(
    const config::SwitchyardConfig& config) {
  const auto& m = config.model();
  const std::string& opt = config.training().optimizer();
  std::vector<ShardFootprint> shards;
  const int64_t d = m.d_model();
  const int64_t f = m.d_ff() / m.shards_per_expert();
  const int64_t gates = m.activation() == "swiglu" ? 2 : 1;
  for (int layer = 0; layer < NumMoeLayers(m); ++layer) {
    for (int e = 0; e < m.num_experts(); ++e) {
      for (int s = 0; s < m.shards_per_expert(); ++s) {
        ShardFootprint fp;
        fp.id = ShardId::Expert(layer, e, s);
        fp.num_params = ExpertShardParams(m, s);
        fp.bytes = TensorBytes(opt, d, gates * f) + TensorBytes(opt, f, d);
        if (m.expert_bias()) {
          fp.bytes += TensorBytes(opt, gates * f, 1);
          if (s == 0) fp.bytes += TensorBytes(opt, d, 1);
        }
        shards.push_back(fp);
      }
    }
  }
  // Dense parameters are split evenly by element; the last shard takes the
  // remainder. Treated as vectors for the optimizer-state estimate, which is
  // the upper bound.
  const int64_t dense = DenseParams(m);
  const int64_t per_shard = dense / m.dense_shards();
  for (int s = 0; s < m.dense_shards(); ++s) {
    ShardFootprint fp;
    fp.id = ShardId::Dense(s);
    fp.num_params = s + 1 == m.dense_shards()
                        ? dense - per_shard * (m.dense_shards() - 1)
                        : per_shard;
    fp.bytes = TensorBytes(opt, fp.num_params, 1);
    shards.push_back(fp);
  }
  return shards;
}

}  // namespace switchyard
