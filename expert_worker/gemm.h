// The GEMM seam: every matrix product of expert compute goes through here, so
// that the CPU (BLAS) and CUDA (cuBLAS) backends implement the same contract.
//
// Row-major: C (m, n) = alpha * op(A) * op(B) + beta * C, where op(A) is
// (m, k) and op(B) is (k, n); lda/ldb/ldc are row strides in elements.
// Deterministic: the same inputs and thread count give the same bits.
// Implementations are thread-compatible (one caller at a time per object).
#ifndef SWITCHYARD_EXPERT_WORKER_GEMM_H_
#define SWITCHYARD_EXPERT_WORKER_GEMM_H_

#include <memory>

#include "common/bf16.h"

namespace switchyard::expert_worker {

class Gemm {
 public:
  virtual ~Gemm() = default;
  virtual void Sgemm(bool trans_a, bool trans_b, int m, int n, int k,
                     float alpha, const float* a, int lda, const float* b,
                     int ldb, float beta, float* c, int ldc) = 0;
  // The same with bf16 operands, fp32 accumulation and an fp32 C.
  virtual void Bf16Gemm(bool trans_a, bool trans_b, int m, int n, int k,
                        float alpha, const BFloat16* a, int lda,
                        const BFloat16* b, int ldb, float beta, float* c,
                        int ldc) = 0;
};

// Sgemm on OpenBLAS, Bf16Gemm on oneDNN's matmul (AVX512-BF16 where the CPU
// has it). `threads` > 0 fixes the thread count (process-wide; a fixed count
// is what makes results reproducible); 0 keeps the libraries' defaults.
std::unique_ptr<Gemm> NewCpuGemm(int threads);

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_GEMM_H_
