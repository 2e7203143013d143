// What the model's shards are and how much memory each needs on a worker.
//
// This is the one place that turns ModelConfig + TrainingConfig into the list
// of placement units. Layer i (0-based) is an MoE layer when
// (i + 1) % moe_every == 0, so GLaM's moe_every = 2 makes layers 1, 3, 5 ...
// sparse. Expert shards are indexed by MoE-layer ordinal, not layer number.
#ifndef SWITCHYARD_COMMON_MODEL_SHAPE_H_
#define SWITCHYARD_COMMON_MODEL_SHAPE_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/ids.h"
#include "config.pb.h"

namespace switchyard {

struct ShardFootprint {
  ShardId id;
  int64_t num_params = 0;
  // Bytes held on the worker: fp32 parameters, fp32 gradient accumulator and
  // the optimizer state (AdamW: two fp32 moments; Adafactor: factored second
  // moments for matrices, full ones for vectors).
  int64_t bytes = 0;
};

int NumMoeLayers(const config::ModelConfig& model);
// Whether transformer layer `layer` (0-based) has an MoE FFN.
bool IsMoeLayer(const config::ModelConfig& model, int layer);
// The transformer layer of MoE layer `moe` (0-based; IsMoeLayer's inverse).
int TransformerLayerOfMoe(const config::ModelConfig& model, int moe);
// Column blocks of an FFN's W1: 2 for SwiGLU ([gate | up]), else 1.
int FfnGates(const config::ModelConfig& model);
// "layers.<layer>.experts.<expert>.": the prefix of an expert's tensors in
// exported and imported safetensors (`layer` is the transformer layer).
std::string ExpertTensorPrefix(int layer, int expert);

// One dense parameter tensor. Dense shards cut the concatenation of all
// dense tensors (in DenseLayout order) into equal flat ranges.
struct DenseTensor {
  enum class Init { kNormal, kOnes, kZeros };
  std::string name;  // "layers.3.attn.wq"
  int64_t rows = 0;
  int64_t cols = 0;  // 1 for vectors.
  Init init = Init::kZeros;
  double init_std = 0;  // kNormal only.
  int64_t offset = 0;   // First element in the flat concatenation.
  int64_t numel() const { return rows * cols; }
  // Its shape in safetensors exports and imports: (rows, cols), or (rows)
  // for a vector (cols 1).
  std::vector<int64_t> shape() const {
    return cols > 1 ? std::vector<int64_t>{rows, cols}
                    : std::vector<int64_t>{rows};
  }
};

// Every dense tensor, in order: tok_embed (vocab, d) N(0, 0.02), pos_embed
// (seq_len, d) N(0, 0.02) when positions are learned; per layer: norm1 and
// norm2 scale (d) ones [and bias (d) zeros for layernorm], attn.wq/wk/wv/wo
// (d, d) N(0, sqrt(init_scale / d)); an MoE layer's router (d, E)
// N(0, sqrt(init_scale / d)); a dense layer's ffn.w1 (d, g*d_ff) and ffn.w2
// (d_ff, d) N(0, sqrt(init_scale / fan_in)) [and ffn.b1, ffn.b2 zeros];
// then final_norm and lm_head (d, vocab) N(0, sqrt(init_scale / d)).
std::vector<DenseTensor> DenseLayout(const config::ModelConfig& model);

// The tensors of a whole (unsharded) expert, and of the dense FFN an expert
// is upcycled from, by name, with their shapes in safetensors exports and
// imports (y = x @ W): w1 (d_model, g * d_ff) with SwiGLU's [gate | up],
// w2 (d_ff, d_model), and with expert_bias b1 (g * d_ff) and b2 (d_model).
std::map<std::string, std::vector<int64_t>> FfnTensorShapes(
    const config::ModelConfig& model);

// Parameters of one expert shard: W1 (d_model, d_ff/S) [twice for SwiGLU],
// b1 (d_ff/S) [twice for SwiGLU], W2 (d_ff/S, d_model), b2 (d_model) on shard
// 0 only, all when expert_bias; else the matrices only.
int64_t ExpertShardParams(const config::ModelConfig& model, int shard);
// Every dense parameter of the model (embeddings, positions, attention,
// norms, dense FFNs, routers, LM head).
int64_t DenseParams(const config::ModelConfig& model);

// Dense shard `shard` holds flat elements [begin, begin + count) of the
// DenseLayout concatenation: equal ranges, the last taking the remainder.
struct DenseRange {
  int64_t begin = 0;
  int64_t count = 0;
};
DenseRange DenseShardRange(const config::ModelConfig& model, int shard);
// The same given DenseParams(model), for loops over the shards: DenseParams
// builds the whole layout, and once per shard of 65536 shards of a
// 1024-layer model that took minutes.
DenseRange DenseShardRange(const config::ModelConfig& model, int shard,
                           int64_t dense_params);

// Every placement unit: expert shards in (layer, expert, shard) order, then
// the dense shards.
std::vector<ShardFootprint> ModelShards(const config::SwitchyardConfig& config);

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_MODEL_SHAPE_H_
