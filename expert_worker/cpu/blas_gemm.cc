// Gemm on the CPU: cblas_sgemm (OpenBLAS) for fp32, oneDNN matmul for bf16.
// oneDNN errors (dnnl::error) are converted here and nowhere else.
#include <cblas.h>
#include <glog/logging.h>
#include <omp.h>

#include <map>
#include <oneapi/dnnl/dnnl.hpp>
#include <tuple>

#include "common/mutex.h"
#include "common/thread_annotations.h"
#include "expert_worker/gemm.h"

namespace switchyard::expert_worker {
namespace {

// One oneDNN matmul per shape, created on first use.
struct MatmulKey {
  bool trans_a, trans_b;
  int m, n, k, lda, ldb, ldc;
  bool accumulate;
  float alpha, beta;
  auto tie() const {
    return std::tie(trans_a, trans_b, m, n, k, lda, ldb, ldc, accumulate, alpha,
                    beta);
  }
  bool operator<(const MatmulKey& o) const { return tie() < o.tie(); }
};

class CpuGemm : public Gemm {
 public:
  CpuGemm() : engine_(dnnl::engine::kind::cpu, 0), stream_(engine_) {}

  void Sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
             const float* a, int lda, const float* b, int ldb, float beta,
             float* c, int ldc) override {
    if (m == 0 || n == 0) return;
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b,
                ldb, beta, c, ldc);
  }

  void Bf16Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                const BFloat16* a, int lda, const BFloat16* b, int ldb,
                float beta, float* c, int ldc) override EXCLUDES(mu_) {
    if (m == 0 || n == 0) return;
    if (k == 0) {  // C = beta * C.
      for (int i = 0; i < m; ++i) {
        for (int j = 0; j < n; ++j) c[int64_t{i} * ldc + j] *= beta;
      }
      return;
    }
    using dt = dnnl::memory::data_type;
    using dims = dnnl::memory::dims;
    const MatmulKey key{trans_a, trans_b,      m,     n,   k, lda, ldb,
                        ldc,     beta != 0.0f, alpha, beta};
    MutexLock lock(&mu_);
    auto it = cache_.find(key);
    if (it == cache_.end()) {
      if (cache_.size() > 512) cache_.clear();  // Bound the cache.
      // Row-major with strides; a transposed operand is read column-wise.
      const dnnl::memory::desc a_md(dims{m, k}, dt::bf16,
                                    trans_a ? dims{1, lda} : dims{lda, 1});
      const dnnl::memory::desc b_md(dims{k, n}, dt::bf16,
                                    trans_b ? dims{1, ldb} : dims{ldb, 1});
      const dnnl::memory::desc c_md(dims{m, n}, dt::f32, dims{ldc, 1});
      dnnl::primitive_attr attr;
      if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
      if (beta != 0.0f) {
        dnnl::post_ops ops;
        ops.append_sum(beta);
        attr.set_post_ops(ops);
      }
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md),
                                      attr, engine_);
      it = cache_.emplace(key, Entry{dnnl::matmul(pd), a_md, b_md, c_md}).first;
    }
    Entry& e = it->second;
    dnnl::memory a_mem(e.a_md, engine_, const_cast<BFloat16*>(a));
    dnnl::memory b_mem(e.b_md, engine_, const_cast<BFloat16*>(b));
    dnnl::memory c_mem(e.c_md, engine_, c);
    e.matmul.execute(stream_, {{DNNL_ARG_SRC, a_mem},
                               {DNNL_ARG_WEIGHTS, b_mem},
                               {DNNL_ARG_DST, c_mem}});
    stream_.wait();
  }

 private:
  struct Entry {
    dnnl::matmul matmul;
    dnnl::memory::desc a_md, b_md, c_md;
  };
  dnnl::engine engine_;
  Mutex mu_;
  // A oneDNN stream is used by one thread at a time.
  dnnl::stream stream_ GUARDED_BY(mu_);
  std::map<MatmulKey, Entry> cache_ GUARDED_BY(mu_);
};

}  // namespace

std::unique_ptr<Gemm> NewCpuGemm(int threads) {
  if (threads > 0) {
    openblas_set_num_threads(threads);
    omp_set_num_threads(threads);  // This thread only: see SetKernelThreads.
  }
  return std::make_unique<CpuGemm>();
}

}  // namespace switchyard::expert_worker
