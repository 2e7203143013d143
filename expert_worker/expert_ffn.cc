#include "expert_worker/expert_ffn.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace switchyard::expert_worker {
namespace {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

inline float Gelu(float h) {
  const float u = kGeluC * (h + kGeluA * h * h * h);
  return 0.5f * h * (1.0f + std::tanh(u));
}
inline float GeluGrad(float h) {
  const float u = kGeluC * (h + kGeluA * h * h * h);
  const float t = std::tanh(u);
  return 0.5f * (1.0f + t) +
         0.5f * h * (1.0f - t * t) * kGeluC * (1.0f + 3.0f * kGeluA * h * h);
}
inline float Sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }
inline float Silu(float z) { return z * Sigmoid(z); }
inline float SiluGrad(float z) {
  const float s = Sigmoid(z);
  return s * (1.0f + z * (1.0f - s));
}

// Adds `bias` (n) to every row of `m` (rows, n).
void AddRowBias(float* m, int64_t rows, int64_t n, const float* bias) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = m + r * n;
    for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
  }
}

// out (n) += column sums of m (rows, n), rows in order.
void AddColumnSums(const float* m, int64_t rows, int64_t n, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = m + r * n;
    for (int64_t j = 0; j < n; ++j) out[j] += row[j];
  }
}

// Returns `src` for fp32 compute, else a bf16-rounded copy in `scratch`.
const float* Operand(const float* src, int64_t n, DType dtype,
                     std::vector<float>* scratch) {
  if (dtype == DType::kF32) return src;
  if (static_cast<int64_t>(scratch->size()) < n) scratch->resize(n);
  std::memcpy(scratch->data(), src, n * sizeof(float));
  RoundToBf16(scratch->data(), n);
  return scratch->data();
}

// Per-thread scratch, grown on demand and reused: no allocation per call
// once warm.
struct Scratch {
  std::vector<float> a, op0, op1;
};
Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

bool IsMatrix(const Tensor& t, int64_t rows, int64_t cols) {
  return t.dtype() == DType::kF32 && t.rank() == 2 && t.dim(0) == rows &&
         t.dim(1) == cols;
}

}  // namespace

void RoundToBf16(float* data, int64_t n) {
  for (int64_t i = 0; i < n; ++i) data[i] = Bf16ToFloat(FloatToBf16(data[i]));
}

StatusOr<Activation> ParseActivation(const std::string& name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "relu") return Activation::kRelu;
  if (name == "swiglu") return Activation::kSwiglu;
  return InvalidArgumentError("unknown activation '" + name + "'");
}

StatusOr<ExpertParams> ExpertParams::Zeros(const ExpertShape& s) {
  const int64_t gf = static_cast<int64_t>(s.gates()) * s.d_ff_shard;
  ExpertParams p;
  ASSIGN_OR_RETURN(p.w1, Tensor::Zeros(DType::kF32, {s.d_model, gf}));
  ASSIGN_OR_RETURN(p.w2, Tensor::Zeros(DType::kF32, {s.d_ff_shard, s.d_model}));
  if (s.has_b1) {
    ASSIGN_OR_RETURN(p.b1, Tensor::Zeros(DType::kF32, {gf}));
  }
  if (s.has_b2) {
    ASSIGN_OR_RETURN(p.b2, Tensor::Zeros(DType::kF32, {s.d_model}));
  }
  return p;
}

Status ExpertFfn::CheckShapes(const ExpertParams& p, const Tensor& x,
                              int64_t tokens) const {
  const int64_t d = shape_.d_model, f = shape_.d_ff_shard;
  const int64_t gf = shape_.gates() * f;
  if (!IsMatrix(p.w1, d, gf) || !IsMatrix(p.w2, f, d) ||
      p.b1.empty() == shape_.has_b1 || p.b2.empty() == shape_.has_b2) {
    return InvalidArgumentError("expert parameters do not match the shape");
  }
  if (!IsMatrix(x, tokens, d)) {
    return InvalidArgumentError("expert input " + x.DebugString() +
                                " is not f32[" + std::to_string(tokens) + "," +
                                std::to_string(d) + "]");
  }
  return OkStatus();
}

void ExpertFfn::Activate(const float* hp, int64_t tokens, float* ap) const {
  const int64_t f = shape_.d_ff_shard;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = hp + t * shape_.gates() * f;
    float* out = ap + t * f;
    switch (shape_.activation) {
      case Activation::kGelu:
        for (int64_t j = 0; j < f; ++j) out[j] = Gelu(row[j]);
        break;
      case Activation::kRelu:
        for (int64_t j = 0; j < f; ++j) out[j] = row[j] > 0 ? row[j] : 0.0f;
        break;
      case Activation::kSwiglu:
        for (int64_t j = 0; j < f; ++j) out[j] = Silu(row[j]) * row[f + j];
        break;
    }
  }
}

Status ExpertFfn::Forward(const ExpertParams& p, const Tensor& x, Tensor* h,
                          Tensor* y) const {
  const int64_t tokens = x.rank() == 2 ? x.dim(0) : -1;
  RETURN_IF_ERROR(CheckShapes(p, x, tokens));
  const int d = shape_.d_model, f = shape_.d_ff_shard, gf = shape_.gates() * f;
  if (!IsMatrix(*h, tokens, gf) || !IsMatrix(*y, tokens, d)) {
    return InvalidArgumentError("expert forward outputs are mis-sized");
  }
  if (tokens == 0) return OkStatus();
  Scratch& s = ThreadScratch();
  const DType dt = shape_.compute_dtype;
  // h = x W1 + b1
  gemm_->Sgemm(false, false, tokens, gf, d, 1.0f,
               Operand(x.f32(), tokens * d, dt, &s.op0), d,
               Operand(p.w1.f32(), int64_t{d} * gf, dt, &s.op1), gf, 0.0f,
               h->f32(), gf);
  if (shape_.has_b1) AddRowBias(h->f32(), tokens, gf, p.b1.f32());
  // a = act(h); y = a W2 + b2
  if (static_cast<int64_t>(s.a.size()) < tokens * f) s.a.resize(tokens * f);
  float* ap = s.a.data();
  Activate(h->f32(), tokens, ap);
  if (dt == DType::kBF16) RoundToBf16(ap, tokens * f);
  gemm_->Sgemm(false, false, tokens, d, f, 1.0f, ap, f,
               Operand(p.w2.f32(), int64_t{f} * d, dt, &s.op1), d, 0.0f,
               y->f32(), d);
  if (shape_.has_b2) AddRowBias(y->f32(), tokens, d, p.b2.f32());
  return OkStatus();
}

Status ExpertFfn::BackwardInput(const ExpertParams& p, const Tensor& h,
                                const Tensor& dy, Tensor* dh,
                                Tensor* dx) const {
  const int64_t tokens = dy.rank() == 2 ? dy.dim(0) : -1;
  RETURN_IF_ERROR(CheckShapes(p, dy, tokens));
  const int d = shape_.d_model, f = shape_.d_ff_shard, gf = shape_.gates() * f;
  if (!IsMatrix(h, tokens, gf) || !IsMatrix(*dh, tokens, gf) ||
      !IsMatrix(*dx, tokens, d)) {
    return InvalidArgumentError("expert backward tensors are mis-sized");
  }
  if (tokens == 0) return OkStatus();
  Scratch& s = ThreadScratch();
  const DType dt = shape_.compute_dtype;
  // da = dy W2^T: (T, f), written into the scratch activation buffer.
  if (static_cast<int64_t>(s.a.size()) < tokens * f) s.a.resize(tokens * f);
  float* da = s.a.data();
  gemm_->Sgemm(false, true, tokens, f, d, 1.0f,
               Operand(dy.f32(), tokens * d, dt, &s.op0), d,
               Operand(p.w2.f32(), int64_t{f} * d, dt, &s.op1), d, 0.0f, da, f);
  // dh = da * act'(h)
  const float* hp = h.f32();
  float* dhp = dh->f32();
  for (int64_t t = 0; t < tokens; ++t) {
    const float* hr = hp + t * gf;
    const float* dar = da + t * f;
    float* out = dhp + t * gf;
    switch (shape_.activation) {
      case Activation::kGelu:
        for (int j = 0; j < f; ++j) out[j] = dar[j] * GeluGrad(hr[j]);
        break;
      case Activation::kRelu:
        for (int j = 0; j < f; ++j) out[j] = hr[j] > 0 ? dar[j] : 0.0f;
        break;
      case Activation::kSwiglu:
        for (int j = 0; j < f; ++j) {
          out[j] = dar[j] * hr[f + j] * SiluGrad(hr[j]);
          out[f + j] = dar[j] * Silu(hr[j]);
        }
        break;
    }
  }
  // dx = dh W1^T
  gemm_->Sgemm(false, true, tokens, d, gf, 1.0f,
               Operand(dhp, tokens * gf, dt, &s.op0), gf,
               Operand(p.w1.f32(), int64_t{d} * gf, dt, &s.op1), gf, 0.0f,
               dx->f32(), d);
  return OkStatus();
}

Status ExpertFfn::AccumulateGrads(const Tensor& x, const Tensor& h,
                                  const Tensor& dh, const Tensor& dy,
                                  ExpertParams* grads) const {
  const int64_t tokens = x.rank() == 2 ? x.dim(0) : -1;
  RETURN_IF_ERROR(CheckShapes(*grads, x, tokens));
  const int d = shape_.d_model, f = shape_.d_ff_shard, gf = shape_.gates() * f;
  if (!IsMatrix(h, tokens, gf) || !IsMatrix(dh, tokens, gf) ||
      !IsMatrix(dy, tokens, d)) {
    return InvalidArgumentError("expert gradient inputs are mis-sized");
  }
  if (tokens == 0) return OkStatus();
  Scratch& s = ThreadScratch();
  const DType dt = shape_.compute_dtype;
  // dW1 += x^T dh
  gemm_->Sgemm(true, false, d, gf, tokens, 1.0f,
               Operand(x.f32(), tokens * d, dt, &s.op0), d,
               Operand(dh.f32(), tokens * gf, dt, &s.op1), gf, 1.0f,
               grads->w1.f32(), gf);
  if (shape_.has_b1) AddColumnSums(dh.f32(), tokens, gf, grads->b1.f32());
  // dW2 += act(h)^T dy
  if (static_cast<int64_t>(s.a.size()) < tokens * f) s.a.resize(tokens * f);
  float* ap = s.a.data();
  Activate(h.f32(), tokens, ap);
  if (dt == DType::kBF16) RoundToBf16(ap, tokens * f);
  gemm_->Sgemm(true, false, f, d, tokens, 1.0f, ap, f,
               Operand(dy.f32(), tokens * d, dt, &s.op0), d, 1.0f,
               grads->w2.f32(), d);
  if (shape_.has_b2) AddColumnSums(dy.f32(), tokens, d, grads->b2.f32());
  return OkStatus();
}

}  // namespace switchyard::expert_worker
