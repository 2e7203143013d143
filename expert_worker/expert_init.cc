#include "expert_worker/expert_init.h"

#include <cmath>

#include "common/random.h"

namespace switchyard::expert_worker {
namespace {
constexpr uint64_t kTagW1 = 1;
constexpr uint64_t kTagW2 = 2;
}  // namespace

StatusOr<ExpertShape> ExpertShardShape(const config::SwitchyardConfig& config,
                                       int shard) {
  const auto& m = config.model();
  ExpertShape shape;
  shape.d_model = m.d_model();
  shape.d_ff_shard = m.d_ff() / m.shards_per_expert();
  ASSIGN_OR_RETURN(shape.activation, ParseActivation(m.activation()));
  shape.has_b1 = m.expert_bias();
  shape.has_b2 = m.expert_bias() && shard == 0;
  ASSIGN_OR_RETURN(shape.compute_dtype,
                   ParseDType(config.training().compute_dtype()));
  return shape;
}

StatusOr<ExpertParams> InitialExpertParams(
    const config::SwitchyardConfig& config, const ShardId& id) {
  const auto& m = config.model();
  ASSIGN_OR_RETURN(ExpertShape shape, ExpertShardShape(config, id.shard));
  ASSIGN_OR_RETURN(ExpertParams params, ExpertParams::Zeros(shape));
  const int64_t d = m.d_model(), f = shape.d_ff_shard;
  const int gates = shape.gates();
  const uint64_t seed = config.training().seed();
  const double std1 = std::sqrt(m.init_scale() / m.d_model());
  const double std2 = std::sqrt(m.init_scale() / m.d_ff());
  const uint64_t layer = static_cast<uint64_t>(id.layer);
  const uint64_t expert = static_cast<uint64_t>(id.expert);
  // Every element is a pure function of its coordinates, so rows are drawn
  // on all cores (a shard of 1 GB is 256 M normals) with the same result.
  // W1 (d, gates*f): column g*f + j is global column g*d_ff + shard*f + j.
  float* w1 = params.w1.f32();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < d; ++i) {
    for (int g = 0; g < gates; ++g) {
      for (int64_t j = 0; j < f; ++j) {
        const uint64_t col = g * m.d_ff() + id.shard * f + j;
        w1[i * gates * f + g * f + j] = static_cast<float>(
            std1 * RandomNormal(seed, {kTagW1, layer, expert,
                                       static_cast<uint64_t>(i), col}));
      }
    }
  }
  // W2 (f, d): row i is global row shard*f + i.
  float* w2 = params.w2.f32();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < f; ++i) {
    for (int64_t o = 0; o < d; ++o) {
      const uint64_t row = id.shard * f + i;
      w2[i * d + o] = static_cast<float>(
          std2 * RandomNormal(seed, {kTagW2, layer, expert, row,
                                     static_cast<uint64_t>(o)}));
    }
  }
  if (shape.compute_dtype == DType::kBF16)
    RETURN_IF_ERROR(params.RefreshBf16());
  return params;
}

}  // namespace switchyard::expert_worker
