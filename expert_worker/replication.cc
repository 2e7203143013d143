#include "expert_worker/replication.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace switchyard::expert_worker {

namespace {

constexpr int kMaxReplicas = 64;  // config.cc's bound on max_replicas.
constexpr double kTokensRadix = 16777216.0;  // 2^24

}  // namespace

double MeanExpertTokensPerStep(const config::SwitchyardConfig& config) {
  const auto& m = config.model();
  const double tokens = static_cast<double>(config.cluster().trainers()) *
                        config.training().batch_size() * m.seq_len() *
                        m.top_k();
  return m.num_experts() > 0 ? tokens / m.num_experts() : 0;
}

int PlanReplicas(const config::ReplicationConfig& replication, int current,
                 int64_t tokens, double mean_tokens) {
  if (mean_tokens <= 0 || replication.max_replicas() <= 1) return 1;
  const double load = static_cast<double>(tokens) / mean_tokens;
  const bool hot = load >= replication.hot_load() ||
                   (current > 1 && load >= replication.cool_load());
  if (!hot) return 1;
  const double wanted = std::ceil(load);
  return static_cast<int>(
      std::clamp(wanted, 2.0, static_cast<double>(replication.max_replicas())));
}

RowRange ChunkRows(int64_t rows, int chunks, int c) {
  return {rows * c / chunks, rows * (c + 1) / chunks};
}

StatusOr<Tensor> NewReplicationTensor() {
  ASSIGN_OR_RETURN(Tensor repl, Tensor::Zeros(DType::kF32, {3}));
  WriteReplication({}, &repl);
  return repl;
}

StatusOr<ReplicationState> ReadReplication(const Tensor& repl,
                                           const std::string& shard) {
  const auto corrupt = [&](const std::string& why) {
    return DataLossError(shard + "'s replication plan (tensor repl) " + why);
  };
  if (repl.dtype() != DType::kF32 || repl.shape() != std::vector<int64_t>{3}) {
    return corrupt("is " + repl.DebugString() + ", not fp32 [3]");
  }
  const float* v = repl.f32();
  const auto integral = [](float x, double below) {
    return std::isfinite(x) && x >= 0 && x < below && x == std::floor(x);
  };
  if (!integral(v[0], kMaxReplicas + 1) || v[0] < 1) {
    return corrupt("has " + std::to_string(v[0]) +
                   " replicas; a plan has 1 to 64");
  }
  if (!integral(v[1], kTokensRadix) || !integral(v[2], kTokensRadix)) {
    return corrupt("holds no token count (" + std::to_string(v[1]) + ", " +
                   std::to_string(v[2]) + ")");
  }
  ReplicationState state;
  state.replicas = static_cast<int>(v[0]);
  state.window_tokens = static_cast<int64_t>(v[1]) * (int64_t{1} << 24) +
                        static_cast<int64_t>(v[2]);
  return state;
}

void WriteReplication(const ReplicationState& state, Tensor* repl) {
  float* v = repl->f32();
  v[0] = static_cast<float>(state.replicas);
  v[1] = static_cast<float>(state.window_tokens >> 24);
  v[2] = static_cast<float>(state.window_tokens & ((int64_t{1} << 24) - 1));
}

namespace {

std::vector<Tensor*> Parts(ExpertParams* p) {
  std::vector<Tensor*> parts;
  for (Tensor* t : {&p->w1, &p->b1, &p->w2, &p->b2}) {
    if (!t->empty()) parts.push_back(t);
  }
  return parts;
}

}  // namespace

StatusOr<Tensor> FlattenParams(const ExpertParams& params, BufferPool* pool) {
  ExpertParams& p = const_cast<ExpertParams&>(params);  // Read only.
  int64_t n = 0;
  for (const Tensor* t : Parts(&p)) n += t->num_elements();
  ASSIGN_OR_RETURN(Tensor flat, pool != nullptr
                                    ? pool->Take(DType::kF32, {1, n})
                                    : Tensor::Zeros(DType::kF32, {1, n}));
  char* dst = static_cast<char*>(flat.data());
  for (const Tensor* t : Parts(&p)) {
    std::memcpy(dst, t->data(), t->num_bytes());
    dst += t->num_bytes();
  }
  return flat;
}

Status UnflattenParams(const Tensor& flat, ExpertParams* params) {
  int64_t n = 0;
  for (const Tensor* t : Parts(params)) n += t->num_elements();
  if (flat.empty() || flat.dtype() != DType::kF32 || flat.num_elements() != n) {
    return InvalidArgumentError("expert parameters of " + std::to_string(n) +
                                " fp32 values, not " +
                                (flat.empty() ? "<none>" : flat.DebugString()));
  }
  const char* src = static_cast<const char*>(flat.data());
  for (Tensor* t : Parts(params)) {
    std::memcpy(t->data(), src, t->num_bytes());
    src += t->num_bytes();
  }
  return OkStatus();
}

StatusOr<Tensor> WeightsForCopies(const ExpertParams& params, DType compute,
                                  BufferPool* pool) {
  if (compute != DType::kBF16) return FlattenParams(params, pool);
  const int64_t weights = params.w1.num_elements() + params.w2.num_elements();
  int64_t biases = 0;
  for (const Tensor* b : {&params.b1, &params.b2}) {
    biases += b->empty() ? 0 : b->num_elements();
  }
  const std::vector<int64_t> shape = {1, weights + 2 * biases};
  ASSIGN_OR_RETURN(Tensor flat, pool != nullptr
                                    ? pool->Take(DType::kBF16, shape)
                                    : Tensor::Zeros(DType::kBF16, shape));
  char* dst = static_cast<char*>(flat.data());
  for (const auto& [w, w16] : {std::pair{&params.w1, &params.w1_bf16},
                               std::pair{&params.w2, &params.w2_bf16}}) {
    const int64_t n = w->num_elements();
    if (!w16->empty() && w16->num_elements() == n) {
      std::memcpy(dst, w16->data(), w16->num_bytes());
    } else {
      FloatsToBf16(w->f32(), n, reinterpret_cast<BFloat16*>(dst));
    }
    dst += n * sizeof(BFloat16);
  }
  for (const Tensor* b : {&params.b1, &params.b2}) {
    if (b->empty()) continue;
    std::memcpy(dst, b->data(), b->num_bytes());
    dst += b->num_bytes();
  }
  return flat;
}

int64_t CopyWeightsElements(const ExpertShape& shape) {
  if (shape.compute_dtype != DType::kBF16) return shape.num_params();
  // Biases take two bf16 elements a value.
  const int64_t weights =
      int64_t{shape.gates() + 1} * shape.d_ff_shard * shape.d_model;
  return weights + 2 * (shape.num_params() - weights);
}

Status CheckCopyWeights(const Tensor& weights, const ExpertShape& shape) {
  const DType dtype = shape.compute_dtype;
  const int64_t n = CopyWeightsElements(shape);
  if (!weights.empty() && weights.dtype() == dtype &&
      weights.num_elements() == n) {
    return OkStatus();
  }
  return InvalidArgumentError(
      "expert weights of " + std::to_string(n) + " " +
      std::string(DTypeName(dtype)) + " values, not " +
      (weights.empty() ? "<none>" : weights.DebugString()));
}

Status TakeWeights(const Tensor& weights, const ExpertShape& shape,
                   ExpertParams* params) {
  RETURN_IF_ERROR(CheckCopyWeights(weights, shape));
  if (shape.compute_dtype != DType::kBF16) {
    return UnflattenParams(weights, params);
  }
  const char* src = static_cast<const char*>(weights.data());
  for (Tensor* t :
       {&params->w1_bf16, &params->w2_bf16, &params->b1, &params->b2}) {
    if (t->empty()) continue;
    std::memcpy(t->data(), src, t->num_bytes());
    src += t->num_bytes();
  }
  return OkStatus();
}

}  // namespace switchyard::expert_worker
