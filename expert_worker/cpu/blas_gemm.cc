// Gemm on OpenBLAS (cblas_sgemm).
#include <cblas.h>

#include "expert_worker/gemm.h"

namespace switchyard::expert_worker {
namespace {

class CpuGemm : public Gemm {
 public:
  void Sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
             const float* a, int lda, const float* b, int ldb, float beta,
             float* c, int ldc) override {
    if (m == 0 || n == 0) return;
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b,
                ldb, beta, c, ldc);
  }
};

}  // namespace

std::unique_ptr<Gemm> NewCpuGemm(int threads) {
  if (threads > 0) openblas_set_num_threads(threads);
  return std::make_unique<CpuGemm>();
}

}  // namespace switchyard::expert_worker
