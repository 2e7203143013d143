// Which OpenBLAS kernels the process computes with.
//
// Debian's OpenBLAS 0.3.21 does not recognise recent AVX-512 CPUs (AMD Zen 4
// here) and falls back to its Haswell (AVX2) kernels: about 200 GFLOP/s of
// sgemm on this 2-core machine, against about 365 GFLOP/s with its SkylakeX
// kernels, which compute correctly on it (bench/expert_ffn). OpenBLAS picks
// its kernels once, when it loads, from OPENBLAS_CORETYPE; so the choice is
// made by re-executing the process with that variable set.
#ifndef SWITCHYARD_EXPERT_WORKER_CPU_BLAS_KERNELS_H_
#define SWITCHYARD_EXPERT_WORKER_CPU_BLAS_KERNELS_H_

namespace switchyard::expert_worker {

// Call first in main(). When OPENBLAS_CORETYPE is unset, the CPU has
// AVX-512 (F, BW, DQ, VL, CD) and OpenBLAS chose a non-AVX-512 kernel, sets
// OPENBLAS_CORETYPE=SkylakeX and re-executes /proc/self/exe with the same
// arguments (once: the variable is then set). Every Switchyard process
// applies the same rule, so all processes of a run compute with the same
// kernels, which bit-exact reproducibility needs. Setting OPENBLAS_CORETYPE
// (to any value) opts out.
void SelectBlasKernels(char** argv);

// OpenBLAS's name for the kernels in use ("SkylakeX", "Haswell", ...).
const char* BlasKernelName();

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_CPU_BLAS_KERNELS_H_
