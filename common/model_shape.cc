#include "common/model_shape.h"

#include <cmath>

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

int TransformerLayerOfMoe(const config::ModelConfig& model, int moe) {
  return (moe + 1) * model.moe_every() - 1;
}

int FfnGates(const config::ModelConfig& model) {
  return model.activation() == "swiglu" ? 2 : 1;
}

std::string ExpertTensorPrefix(int layer, int expert) {
  return "layers." + std::to_string(layer) + ".experts." +
         std::to_string(expert) + ".";
}

std::map<std::string, std::vector<int64_t>> FfnTensorShapes(
    const config::ModelConfig& m) {
  const int64_t d = m.d_model(), ff = m.d_ff(), gates = FfnGates(m);
  std::map<std::string, std::vector<int64_t>> shapes = {{"w1", {d, gates * ff}},
                                                        {"w2", {ff, d}}};
  if (m.expert_bias()) {
    shapes["b1"] = {gates * ff};
    shapes["b2"] = {d};
  }
  return shapes;
}

int64_t ExpertShardParams(const config::ModelConfig& m, int shard) {
  const int64_t d = m.d_model();
  const int64_t f = m.d_ff() / m.shards_per_expert();
  const int64_t gates = FfnGates(m);
  int64_t params = gates * d * f + f * d;
  if (m.expert_bias()) params += gates * f + (shard == 0 ? d : 0);
  return params;
}

std::vector<DenseTensor> DenseLayout(const config::ModelConfig& m) {
  const int64_t d = m.d_model();
  const double scale = m.init_scale();
  std::vector<DenseTensor> layout;
  int64_t offset = 0;
  auto add = [&](std::string name, int64_t rows, int64_t cols,
                 DenseTensor::Init init, double std = 0) {
    layout.push_back({std::move(name), rows, cols, init, std, offset});
    offset += rows * cols;
  };
  auto normal = [&](const std::string& name, int64_t rows, int64_t cols) {
    add(name, rows, cols, DenseTensor::Init::kNormal,
        std::sqrt(scale / static_cast<double>(rows)));
  };
  auto norm = [&](const std::string& prefix) {
    add(prefix + ".scale", d, 1, DenseTensor::Init::kOnes);
    if (m.norm() == "layernorm")
      add(prefix + ".bias", d, 1, DenseTensor::Init::kZeros);
  };
  add("tok_embed", m.vocab_size(), d, DenseTensor::Init::kNormal, 0.02);
  if (m.positions() == "learned") {
    add("pos_embed", m.seq_len(), d, DenseTensor::Init::kNormal, 0.02);
  }
  const int64_t gates = FfnGates(m);
  for (int layer = 0; layer < m.num_layers(); ++layer) {
    const std::string p = "layers." + std::to_string(layer);
    norm(p + ".norm1");
    for (const char* w : {"wq", "wk", "wv", "wo"})
      normal(p + ".attn." + w, d, d);
    norm(p + ".norm2");
    if (IsMoeLayer(m, layer)) {
      normal(p + ".router", d, m.num_experts());
    } else {
      normal(p + ".ffn.w1", d, gates * m.d_ff());
      if (m.expert_bias()) {
        add(p + ".ffn.b1", gates * m.d_ff(), 1, DenseTensor::Init::kZeros);
      }
      normal(p + ".ffn.w2", m.d_ff(), d);
      if (m.expert_bias()) add(p + ".ffn.b2", d, 1, DenseTensor::Init::kZeros);
    }
  }
  norm("final_norm");
  normal("lm_head", d, m.vocab_size());
  return layout;
}

int64_t DenseParams(const config::ModelConfig& m) {
  const auto layout = DenseLayout(m);
  return layout.back().offset + layout.back().numel();
}

DenseRange DenseShardRange(const config::ModelConfig& m, int shard) {
  return DenseShardRange(m, shard, DenseParams(m));
}

DenseRange DenseShardRange(const config::ModelConfig& m, int shard,
                           int64_t dense) {
  const int64_t per_shard = dense / m.dense_shards();
  const int64_t begin = per_shard * shard;
  return {begin, shard + 1 == m.dense_shards() ? dense - begin : per_shard};
}

std::vector<ShardFootprint> ModelShards(
    const config::SwitchyardConfig& config) {
  const auto& m = config.model();
  const std::string& opt = config.training().optimizer();
  std::vector<ShardFootprint> shards;
  const int64_t d = m.d_model();
  const int64_t f = m.d_ff() / m.shards_per_expert();
  const int64_t gates = FfnGates(m);
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
  // Dense shards are flat vectors to the optimizer (full second moments).
  const int64_t dense = DenseParams(m);
  for (int s = 0; s < m.dense_shards(); ++s) {
    ShardFootprint fp;
    fp.id = ShardId::Dense(s);
    fp.num_params = DenseShardRange(m, s, dense).count;
    fp.bytes = TensorBytes(opt, fp.num_params, 1);
    shards.push_back(fp);
  }
  return shards;
}

}  // namespace switchyard
