#include "expert_worker/expert_ffn.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "common/metrics.h"

namespace switchyard::expert_worker {
namespace {

// Where a worker's compute time goes (bench/moe_layer prints it).
Counter* GemmMicros() {
  static Counter* c = MetricsRegistry::Global().GetCounter(
      "switchyard_worker_gemm_microseconds_total");
  return c;
}
Counter* ActivationMicros() {
  static Counter* c = MetricsRegistry::Global().GetCounter(
      "switchyard_worker_activation_microseconds_total");
  return c;
}

// out (n) += column sums of m (rows, n), rows in order.
void AddColumnSums(const float* m, int64_t rows, int64_t n, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = m + r * n;
    for (int64_t j = 0; j < n; ++j) out[j] += row[j];
  }
}

// bf16 copy of `src` (n elements) in `scratch`.
const BFloat16* ToBf16(const float* src, int64_t n,
                       std::vector<BFloat16>* scratch) {
  if (static_cast<int64_t>(scratch->size()) < n) scratch->resize(n);
  ConvertToBf16(src, n, scratch->data());
  return scratch->data();
}

// Per-thread scratch, grown on demand and reused: no allocation per call
// once warm.
struct Scratch {
  std::vector<float> a;
  std::vector<BFloat16> op0, op1;
};
Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// C = op(A) op(B) (+ C when accumulate), in the compute dtype: fp32 GEMM, or
// bf16 operands (a_elems / b_elems converted into scratch, unless B comes
// already converted as b_bf16) with fp32 accumulation.
void Product(Gemm* gemm, DType dtype, bool trans_a, bool trans_b, int m, int n,
             int k, const float* a, int lda, int64_t a_elems, const float* b,
             int ldb, int64_t b_elems, bool accumulate, float* c, int ldc,
             const Tensor* b_bf16 = nullptr) {
  ScopedMicros timed(GemmMicros());  // bf16 operand conversion included.
  const float beta = accumulate ? 1.0f : 0.0f;
  if (dtype == DType::kF32) {
    gemm->Sgemm(trans_a, trans_b, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  Scratch& s = ThreadScratch();
  const BFloat16* b16 = b_bf16 != nullptr && !b_bf16->empty()
                            ? b_bf16->bf16()
                            : ToBf16(b, b_elems, &s.op1);
  gemm->Bf16Gemm(trans_a, trans_b, m, n, k, 1.0f, ToBf16(a, a_elems, &s.op0),
                 lda, b16, ldb, beta, c, ldc);
}

bool IsMatrix(const Tensor& t, int64_t rows, int64_t cols) {
  return t.dtype() == DType::kF32 && t.rank() == 2 && t.dim(0) == rows &&
         t.dim(1) == cols;
}

}  // namespace

StatusOr<Activation> ParseActivation(const std::string& name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "relu") return Activation::kRelu;
  if (name == "swiglu") return Activation::kSwiglu;
  return InvalidArgumentError("unknown activation '" + name + "'");
}

Status ExpertParams::MakeBf16Storage() {
  // Reuses the copies' storage after the first call: no fresh pages per
  // update.
  for (auto [w, copy] : {std::pair{&w1, &w1_bf16}, {&w2, &w2_bf16}}) {
    if (copy->empty() || copy->shape() != w->shape()) {
      ASSIGN_OR_RETURN(*copy, Tensor::Zeros(DType::kBF16, w->shape()));
    }
  }
  return OkStatus();
}

Status ExpertParams::RefreshBf16() {
  RETURN_IF_ERROR(MakeBf16Storage());
  RETURN_IF_ERROR(w1.ConvertInto(&w1_bf16));
  return w2.ConvertInto(&w2_bf16);
}

StatusOr<ExpertParams> ExpertParams::Zeros(const ExpertShape& s,
                                           DType weights) {
  const int64_t gf = static_cast<int64_t>(s.gates()) * s.d_ff_shard;
  ExpertParams p;
  const bool bf16 = weights == DType::kBF16;
  Tensor& w1 = bf16 ? p.w1_bf16 : p.w1;
  Tensor& w2 = bf16 ? p.w2_bf16 : p.w2;
  ASSIGN_OR_RETURN(w1, Tensor::Zeros(weights, {s.d_model, gf}));
  ASSIGN_OR_RETURN(w2, Tensor::Zeros(weights, {s.d_ff_shard, s.d_model}));
  if (s.has_b1) {
    ASSIGN_OR_RETURN(p.b1, Tensor::Zeros(DType::kF32, {gf}));
  }
  if (s.has_b2) {
    ASSIGN_OR_RETURN(p.b2, Tensor::Zeros(DType::kF32, {s.d_model}));
  }
  return p;
}

Status ExpertFfn::CheckShapes(const ExpertParams& p, const Tensor& x,
                              int64_t tokens, bool bf16_weights) const {
  const int64_t d = shape_.d_model, f = shape_.d_ff_shard;
  const int64_t gf = shape_.gates() * f;
  // A weight matrix in fp32, or for bf16 compute in bf16 alone (a copy's,
  // ExpertParams): the products multiply by the bf16 one when it is there.
  const auto weight = [&](const Tensor& w, const Tensor& w16, int64_t rows,
                          int64_t cols) {
    if (IsMatrix(w, rows, cols)) return true;
    return bf16_weights && shape_.compute_dtype == DType::kBF16 && w.empty() &&
           w16.dtype() == DType::kBF16 && w16.rank() == 2 &&
           w16.dim(0) == rows && w16.dim(1) == cols;
  };
  if (!weight(p.w1, p.w1_bf16, d, gf) || !weight(p.w2, p.w2_bf16, f, d) ||
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
  return Forward(p, x, nullptr, h, y);
}

Status ExpertFfn::BackwardInput(const ExpertParams& p, const Tensor& h,
                                const Tensor& dy, Tensor* dh, Tensor* a,
                                Tensor* dx) const {
  return BackwardInput(p, h, dy, nullptr, dh, a, dx);
}

Status ExpertFfn::Forward(const ExpertParams& p, const Tensor& x,
                          const float* keep, Tensor* h, Tensor* y) const {
  const int64_t tokens = x.rank() == 2 ? x.dim(0) : -1;
  RETURN_IF_ERROR(CheckShapes(p, x, tokens, /*bf16_weights=*/true));
  const int d = shape_.d_model, f = shape_.d_ff_shard, gf = shape_.gates() * f;
  if (!IsMatrix(*h, tokens, gf) || !IsMatrix(*y, tokens, d)) {
    return InvalidArgumentError("expert forward outputs are mis-sized");
  }
  if (tokens == 0) return OkStatus();
  Scratch& s = ThreadScratch();
  const DType dt = shape_.compute_dtype;
  // h = x W1 (+ b1, added by ActivationForward in its pass over h)
  Product(gemm_, dt, false, false, tokens, gf, d, x.f32(), d, tokens * d,
          p.w1.f32(), gf, int64_t{d} * gf, false, h->f32(), gf, &p.w1_bf16);
  // a = act(h); y = a W2 + b2
  if (static_cast<int64_t>(s.a.size()) < tokens * f) s.a.resize(tokens * f);
  float* ap = s.a.data();
  {
    ScopedMicros timed(ActivationMicros());
    ActivationForward(shape_.activation, h->f32(),
                      shape_.has_b1 ? p.b1.f32() : nullptr, tokens, f, ap);
  }
  if (keep != nullptr) {
    for (int64_t i = 0; i < tokens * f; ++i) ap[i] *= keep[i];
  }
  Product(gemm_, dt, false, false, tokens, d, f, ap, f, tokens * f, p.w2.f32(),
          d, int64_t{f} * d, false, y->f32(), d, &p.w2_bf16);
  if (shape_.has_b2) AddRowBias(y->f32(), tokens, d, p.b2.f32());
  return OkStatus();
}

Status ExpertFfn::BackwardInput(const ExpertParams& p, const Tensor& h,
                                const Tensor& dy, const float* keep, Tensor* dh,
                                Tensor* a, Tensor* dx) const {
  const int64_t tokens = dy.rank() == 2 ? dy.dim(0) : -1;
  RETURN_IF_ERROR(CheckShapes(p, dy, tokens, /*bf16_weights=*/true));
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
  Product(gemm_, dt, false, true, tokens, f, d, dy.f32(), d, tokens * d,
          p.w2.f32(), d, int64_t{f} * d, false, da, f, &p.w2_bf16);
  // Dropout: the gradient reaches only kept units, scaled like them.
  if (keep != nullptr) {
    for (int64_t i = 0; i < tokens * f; ++i) da[i] *= keep[i];
  }
  // dh = da * act'(h), and a = act(h) from the same pass.
  {
    ScopedMicros timed(ActivationMicros());
    ActivationBackward(shape_.activation, h.f32(), da, tokens, f, dh->f32(),
                       a->f32());
  }
  if (keep != nullptr) {
    float* ap = a->f32();
    for (int64_t i = 0; i < tokens * f; ++i) ap[i] *= keep[i];
  }
  // dx = dh W1^T
  Product(gemm_, dt, false, true, tokens, d, gf, dh->f32(), gf, tokens * gf,
          p.w1.f32(), gf, int64_t{d} * gf, false, dx->f32(), d, &p.w1_bf16);
  return OkStatus();
}

Status ExpertFfn::AccumulateGrads(const Tensor& x, const Tensor& a,
                                  const Tensor& dh, const Tensor& dy,
                                  ExpertParams* grads) const {
  return Grads(x, a, dh, dy, /*accumulate=*/true, grads);
}

Status ExpertFfn::ComputeGrads(const Tensor& x, const Tensor& a,
                               const Tensor& dh, const Tensor& dy,
                               ExpertParams* grads) const {
  return Grads(x, a, dh, dy, /*accumulate=*/false, grads);
}

Status ExpertFfn::Grads(const Tensor& x, const Tensor& a, const Tensor& dh,
                        const Tensor& dy, bool accumulate,
                        ExpertParams* grads) const {
  const int64_t tokens = x.rank() == 2 ? x.dim(0) : -1;
  RETURN_IF_ERROR(CheckShapes(*grads, x, tokens));
  const int d = shape_.d_model, f = shape_.d_ff_shard, gf = shape_.gates() * f;
  if (!IsMatrix(a, tokens, f) || !IsMatrix(dh, tokens, gf) ||
      !IsMatrix(dy, tokens, d)) {
    return InvalidArgumentError("expert gradient inputs are mis-sized");
  }
  if (!accumulate) {
    for (Tensor* b : {&grads->b1, &grads->b2}) {
      if (!b->empty()) std::memset(b->data(), 0, b->num_bytes());
    }
    if (tokens == 0) {
      for (Tensor* w : {&grads->w1, &grads->w2}) {
        std::memset(w->data(), 0, w->num_bytes());
      }
    }
  }
  if (tokens == 0) return OkStatus();
  const DType dt = shape_.compute_dtype;
  // dW1 (+)= x^T dh
  Product(gemm_, dt, true, false, d, gf, tokens, x.f32(), d, tokens * d,
          dh.f32(), gf, tokens * gf, accumulate, grads->w1.f32(), gf);
  if (shape_.has_b1) AddColumnSums(dh.f32(), tokens, gf, grads->b1.f32());
  // dW2 (+)= a^T dy
  Product(gemm_, dt, true, false, f, d, tokens, a.f32(), f, tokens * f,
          dy.f32(), d, tokens * d, accumulate, grads->w2.f32(), d);
  if (shape_.has_b2) AddColumnSums(dy.f32(), tokens, d, grads->b2.f32());
  return OkStatus();
}

}  // namespace switchyard::expert_worker
