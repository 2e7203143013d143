// Elementwise activation kernels of the expert FFN (expert_ffn.h has the
// formulas). They run on all cores (OpenMP) and, on CPUs that have them,
// with AVX-512 or AVX2 vectors; every element is computed independently and
// without fused multiply-adds, so results depend neither on the thread
// count nor on the vector width. tanh (a rational approximation within
// 3.6e-7) and exp (for SwiGLU's sigmoid) are Switchyard's own, not glibc's.
#ifndef SWITCHYARD_EXPERT_WORKER_CPU_ACTIVATION_KERNELS_H_
#define SWITCHYARD_EXPERT_WORKER_CPU_ACTIVATION_KERNELS_H_

#include <cstdint>

#include "common/bf16.h"

namespace switchyard::expert_worker {

enum class Activation { kGelu, kRelu, kSwiglu };

// OpenMP's thread count is a per-thread setting (a new thread starts with
// the process default, all cores): every thread that runs these kernels, or
// oneDNN, calls this first with the configured count (> 0; 0 keeps the
// default).
void SetKernelThreads(int threads);

// h: (tokens, g*f) -> a: (tokens, f). With a bias (g*f values), first
// h += bias in place, row by row: one pass over h for both.
void ActivationForward(Activation act, float* h, const float* bias,
                       int64_t tokens, int64_t f, float* a);

// m: (rows, n) += bias (n values) on every row.
void AddRowBias(float* m, int64_t rows, int64_t n, const float* bias);

// dst = src rounded to bf16 (FloatsToBf16), on every kernel thread.
void ConvertToBf16(const float* src, int64_t n, BFloat16* dst);

// h: (tokens, g*f), da: (tokens, f) -> dh: (tokens, g*f) = da * act'(h),
// and a: (tokens, f) = act(h) (for the weight gradient).
void ActivationBackward(Activation act, const float* h, const float* da,
                        int64_t tokens, int64_t f, float* dh, float* a);

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_CPU_ACTIVATION_KERNELS_H_
