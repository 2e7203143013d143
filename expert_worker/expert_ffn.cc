#include "expert_worker/expert_ffn.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace switchyard::expert_worker {
namespace {

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
  ActivationForward(shape_.activation, h->f32(), tokens, f, ap);
  if (dt == DType::kBF16) RoundToBf16(ap, tokens * f);
  gemm_->Sgemm(false, false, tokens, d, f, 1.0f, ap, f,
               Operand(p.w2.f32(), int64_t{f} * d, dt, &s.op1), d, 0.0f,
               y->f32(), d);
  if (shape_.has_b2) AddRowBias(y->f32(), tokens, d, p.b2.f32());
  return OkStatus();
}

Status ExpertFfn::BackwardInput(const ExpertParams& p, const Tensor& h,
                                const Tensor& dy, Tensor* dh, Tensor* a,
                                Tensor* dx) const {
  const int64_t tokens = dy.rank() == 2 ? dy.dim(0) : -1;
  RETURN_IF_ERROR(CheckShapes(p, dy, tokens));
  const int d = shape_.d_model, f = shape_.d_ff_shard, gf = shape_.gates() * f;
  if (!IsMatrix(h, tokens, gf) || !IsMatrix(*dh, tokens, gf) ||
      !IsMatrix(*a, tokens, f) || !IsMatrix(*dx, tokens, d)) {
    return InvalidArgumentError("expert backward tensors are mis-sized");
  }
  if (tokens == 0) return OkStatus();
  Scratch& s = ThreadScratch();
  const DType dt = shape_.compute_dtype;
  // da = dy W2^T: (T, f), in the scratch buffer.
  if (static_cast<int64_t>(s.a.size()) < tokens * f) s.a.resize(tokens * f);
  float* da = s.a.data();
  gemm_->Sgemm(false, true, tokens, f, d, 1.0f,
               Operand(dy.f32(), tokens * d, dt, &s.op0), d,
               Operand(p.w2.f32(), int64_t{f} * d, dt, &s.op1), d, 0.0f, da, f);
  // dh = da * act'(h), and a = act(h) from the same pass.
  ActivationBackward(shape_.activation, h.f32(), da, tokens, f, dh->f32(),
                     a->f32());
  if (dt == DType::kBF16) RoundToBf16(a->f32(), tokens * f);
  // dx = dh W1^T
  gemm_->Sgemm(false, true, tokens, d, gf, 1.0f,
               Operand(dh->f32(), tokens * gf, dt, &s.op0), gf,
               Operand(p.w1.f32(), int64_t{d} * gf, dt, &s.op1), gf, 0.0f,
               dx->f32(), d);
  return OkStatus();
}

Status ExpertFfn::AccumulateGrads(const Tensor& x, const Tensor& a,
                                  const Tensor& dh, const Tensor& dy,
                                  ExpertParams* grads) const {
  const int64_t tokens = x.rank() == 2 ? x.dim(0) : -1;
  RETURN_IF_ERROR(CheckShapes(*grads, x, tokens));
  const int d = shape_.d_model, f = shape_.d_ff_shard, gf = shape_.gates() * f;
  if (!IsMatrix(a, tokens, f) || !IsMatrix(dh, tokens, gf) ||
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
  // dW2 += a^T dy (a is already rounded for bf16 compute)
  gemm_->Sgemm(true, false, f, d, tokens, 1.0f, a.f32(), f,
               Operand(dy.f32(), tokens * d, dt, &s.op0), d, 1.0f,
               grads->w2.f32(), d);
  if (shape_.has_b2) AddColumnSums(dy.f32(), tokens, d, grads->b2.f32());
  return OkStatus();
}

}  // namespace switchyard::expert_worker
