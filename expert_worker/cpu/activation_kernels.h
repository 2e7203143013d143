// Elementwise activation kernels of the expert FFN (expert_ffn.h has the
// formulas). This file is compiled with -ffast-math and OpenMP so that the
// loops use glibc's vector tanhf/expf and all cores; every element is still
// computed independently, so results do not depend on the thread count.
#ifndef SWITCHYARD_EXPERT_WORKER_CPU_ACTIVATION_KERNELS_H_
#define SWITCHYARD_EXPERT_WORKER_CPU_ACTIVATION_KERNELS_H_

#include <cstdint>

namespace switchyard::expert_worker {

enum class Activation { kGelu, kRelu, kSwiglu };

// OpenMP's thread count is a per-thread setting (a new thread starts with
// the process default, all cores): every thread that runs these kernels, or
// oneDNN, calls this first with the configured count (> 0; 0 keeps the
// default).
void SetKernelThreads(int threads);

// h: (tokens, g*f) -> a: (tokens, f).
void ActivationForward(Activation act, const float* h, int64_t tokens,
                       int64_t f, float* a);

// h: (tokens, g*f), da: (tokens, f) -> dh: (tokens, g*f) = da * act'(h),
// and a: (tokens, f) = act(h) (for the weight gradient).
void ActivationBackward(Activation act, const float* h, const float* da,
                        int64_t tokens, int64_t f, float* dh, float* a);

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_CPU_ACTIVATION_KERNELS_H_
