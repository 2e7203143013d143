// Which OpenBLAS kernels the process computes with.
//
// Debian's OpenBLAS 0.3.21 does not recognise recent AVX-512 CPUs (AMD Zen 4
// here); with its Haswell (AVX2) kernels sgemm reaches about 200 GFLOP/s on
// this 2-core machine, with its SkylakeX kernels about 365 GFLOP/s, with
// correct results (bench/expert_ffn). OpenBLAS picks its kernels once, when
// it loads, from OPENBLAS_CORETYPE, so the choice is made by re-executing the
// process with that variable set.
//
// Switchyard chooses from the CPU, not from whatever OPENBLAS_CORETYPE a
// host's environment carries: every process of a run must compute with the
// same kernels for bit-identical results.
#ifndef SWITCHYARD_EXPERT_WORKER_CPU_BLAS_KERNELS_H_
#define SWITCHYARD_EXPERT_WORKER_CPU_BLAS_KERNELS_H_

#include <string>

namespace switchyard::expert_worker {

// The OpenBLAS core type for SWITCHYARD_BLAS_CORETYPE (`requested`):
// "auto" (or empty) gives SkylakeX on CPUs with AVX-512 F/BW/DQ/VL/CD,
// Haswell on CPUs with AVX2 and FMA, and "" (OpenBLAS's own choice)
// otherwise; any other value is used as it is.
std::string ResolveBlasCoreType(const std::string& requested);

// Call first in main(). If OpenBLAS's kernels differ from the resolved core
// type, sets OPENBLAS_CORETYPE to it and re-executes /proc/self/exe with the
// same arguments (at most once).
void SelectBlasKernels(char** argv);

// OpenBLAS's name for the kernels in use ("SkylakeX", "Haswell", ...).
const char* BlasKernelName();

// How the loaded OpenBLAS runs its threads: "OpenMP" (the build Switchyard
// links, whose GEMMs share OpenMP's threads with the activation kernels),
// "pthreads" or "sequential".
const char* BlasThreading();

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_CPU_BLAS_KERNELS_H_
