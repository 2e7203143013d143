#include "expert_worker/shard_factory.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/model_shape.h"
#include "common/random.h"
#include "expert_worker/expert_init.h"
#include "expert_worker/replication.h"

namespace switchyard::expert_worker {
namespace {

constexpr uint64_t kTagDense = 3;  // 1 and 2: expert_init.cc.

// The initial values of dense elements [range.begin, + range.count) into
// `p`. Every element is a pure function of (tensor, index): blocks of the
// range are drawn on all cores, each walking the layout tensors that
// overlap it from the one holding its first element.
void FillInitialDense(const config::SwitchyardConfig& config,
                      const DenseRange& range, float* p) {
  const std::vector<DenseTensor> layout = DenseLayout(config.model());
  constexpr int64_t kBlock = 1 << 16;
  const uint64_t seed = config.training().seed();
#pragma omp parallel for schedule(dynamic)
  for (int64_t block = 0; block < range.count; block += kBlock) {
    const int64_t first = range.begin + block;
    size_t t = static_cast<size_t>(
        std::upper_bound(
            layout.begin(), layout.end(), first,
            [](int64_t g, const DenseTensor& d) { return g < d.offset; }) -
        layout.begin() - 1);
    for (int64_t k = block; k < std::min(range.count, block + kBlock); ++k) {
      const int64_t global = range.begin + k;
      while (global >= layout[t].offset + layout[t].numel()) ++t;
      const DenseTensor& tensor = layout[t];
      const int64_t local = global - tensor.offset;
      switch (tensor.init) {
        case DenseTensor::Init::kOnes:
          p[k] = 1.0f;
          break;
        case DenseTensor::Init::kZeros:
          p[k] = 0.0f;
          break;
        case DenseTensor::Init::kNormal:
          p[k] = static_cast<float>(
              tensor.init_std *
              RandomNormal(seed, {kTagDense, t, static_cast<uint64_t>(local)}));
          break;
      }
    }
  }
}

}  // namespace

StatusOr<std::unique_ptr<ShardFactory>> ShardFactory::Create(
    const config::SwitchyardConfig& config, const Optimizer* optimizer) {
  std::unique_ptr<ShardFactory> factory(new ShardFactory(config, optimizer));
  ASSIGN_OR_RETURN(factory->shape0_, ExpertShardShape(config, 0));
  ASSIGN_OR_RETURN(factory->shape_, ExpertShardShape(config, 1));
  if (!config.checkpoint().init_from().empty()) {
    auto reader =
        storage::SafetensorsReader::Open(config.checkpoint().init_from());
    if (!reader.ok()) {
      return reader.status().WithContext("checkpoint.init_from");
    }
    factory->init_ = std::move(reader).value();
  }
  return factory;
}

StatusOr<std::unique_ptr<ExpertShard>> ShardFactory::NewExpert(
    const ShardId& id, bool initialise) const {
  const ExpertShape& s = shape(id.shard);
  auto shard = std::make_unique<ExpertShard>();
  shard->id = id;
  if (!initialise) {
    ASSIGN_OR_RETURN(shard->params, ExpertParams::Zeros(s));
  } else {
    ASSIGN_OR_RETURN(shard->params, InitialExpertParams(config_, id));
  }
  if (init_ && initialise) {
    RETURN_IF_ERROR(InitExpertFrom(id, &shard->params));
    if (s.compute_dtype == DType::kBF16) {
      RETURN_IF_ERROR(shard->params.RefreshBf16());
    }
  }
  ASSIGN_OR_RETURN(shard->grads, ExpertParams::Zeros(s));
  ASSIGN_OR_RETURN(shard->w1, optimizer_->NewState(shard->params.w1));
  ASSIGN_OR_RETURN(shard->w2, optimizer_->NewState(shard->params.w2));
  if (!shard->params.b1.empty()) {
    ASSIGN_OR_RETURN(shard->b1, optimizer_->NewState(shard->params.b1));
  }
  if (!shard->params.b2.empty()) {
    ASSIGN_OR_RETURN(shard->b2, optimizer_->NewState(shard->params.b2));
  }
  if (config_.replication().enabled()) {
    ASSIGN_OR_RETURN(shard->repl, NewReplicationTensor());
  }
  return shard;
}

StatusOr<std::unique_ptr<DenseShard>> ShardFactory::NewDense(
    int index, bool initialise) const {
  const DenseRange range = DenseShardRange(config_.model(), index);
  auto shard = std::make_unique<DenseShard>();
  shard->index = index;
  ASSIGN_OR_RETURN(shard->params, Tensor::Zeros(DType::kF32, {1, range.count}));
  if (initialise) {
    FillInitialDense(config_, range, shard->params.f32());
    if (init_) RETURN_IF_ERROR(InitDenseFrom(index, &shard->params));
  }
  ASSIGN_OR_RETURN(shard->state, optimizer_->NewState(shard->params));
  return shard;
}

Status ShardFactory::InitExpertFrom(const ShardId& id,
                                    ExpertParams* params) const {
  const auto& m = config_.model();
  const int layer = TransformerLayerOfMoe(m, id.layer);
  const std::string expert = ExpertTensorPrefix(layer, id.expert);
  const std::string dense = "layers." + std::to_string(layer) + ".ffn.";
  // The expert's own tensors, or the dense FFN it is upcycled from.
  const std::string from = init_->Has(expert + "w1")  ? expert
                           : init_->Has(dense + "w1") ? dense
                                                      : "";
  if (from.empty()) return OkStatus();  // Not in the files: random init.
  const int64_t d = m.d_model(), F = m.d_ff();
  const int64_t f = params->w2.dim(0), s0 = id.shard * f;
  const int64_t g = params->w1.dim(1) / f;
  const auto shapes = FfnTensorShapes(m);
  auto load = [&](const std::string& name) -> StatusOr<Tensor> {
    auto t = init_->Read(from + name, shapes.at(name));
    if (!t.ok()) return t.status().WithContext("checkpoint.init_from");
    return t;
  };
  // W1 (d, g*F) [gate | up]: this shard's columns of each block.
  ASSIGN_OR_RETURN(Tensor w1, load("w1"));
  for (int64_t r = 0; r < d; ++r) {
    for (int64_t gate = 0; gate < g; ++gate) {
      std::memcpy(params->w1.f32() + r * g * f + gate * f,
                  w1.f32() + r * g * F + gate * F + s0, f * sizeof(float));
    }
  }
  ASSIGN_OR_RETURN(Tensor w2, load("w2"));
  std::memcpy(params->w2.f32(), w2.f32() + s0 * d, f * d * sizeof(float));
  if (!params->b1.empty() && init_->Has(from + "b1")) {
    ASSIGN_OR_RETURN(Tensor b1, load("b1"));
    for (int64_t gate = 0; gate < g; ++gate) {
      std::memcpy(params->b1.f32() + gate * f, b1.f32() + gate * F + s0,
                  f * sizeof(float));
    }
  }
  if (!params->b2.empty() && init_->Has(from + "b2")) {
    ASSIGN_OR_RETURN(Tensor b2, load("b2"));
    std::memcpy(params->b2.f32(), b2.f32(), d * sizeof(float));
  }
  return OkStatus();
}

Status ShardFactory::InitDenseFrom(int index, Tensor* params) const {
  const auto& m = config_.model();
  const DenseRange range = DenseShardRange(m, index);
  for (const DenseTensor& t : DenseLayout(m)) {
    const int64_t begin = std::max(t.offset, range.begin);
    const int64_t end =
        std::min(t.offset + t.numel(), range.begin + range.count);
    if (begin >= end || !init_->Has(t.name)) continue;
    // The full shape, not only the count: a transposed matrix has the
    // right count and the wrong values.
    auto v = init_->Read(t.name, t.shape());
    if (!v.ok()) return v.status().WithContext("checkpoint.init_from");
    std::memcpy(params->f32() + (begin - range.begin),
                v->f32() + (begin - t.offset), (end - begin) * sizeof(float));
  }
  return OkStatus();
}

}  // namespace switchyard::expert_worker
