#include "expert_worker/cpu/blas_kernels.h"

#include <cblas.h>
#include <strings.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace switchyard::expert_worker {
namespace {
// Set before re-executing, so that a process re-executes at most once.
constexpr char kReexecGuard[] = "SWITCHYARD_BLAS_SELECTED";
}  // namespace

const char* BlasKernelName() { return openblas_get_corename(); }

const char* BlasThreading() {
  switch (openblas_get_parallel()) {
    case 0:
      return "sequential";
    case 1:
      return "pthreads";
    case 2:
      return "OpenMP";
  }
  return "unknown";
}

std::string ResolveBlasCoreType(const std::string& requested) {
  if (!requested.empty() && requested != "auto") return requested;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512cd")) {
    return "SkylakeX";
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return "Haswell";
  }
  return "";
}

void SelectBlasKernels(char** argv) {
  const char* requested = std::getenv("SWITCHYARD_BLAS_CORETYPE");
  const std::string want = ResolveBlasCoreType(requested ? requested : "");
  const char* current = openblas_get_corename();
  if (want.empty() || current == nullptr ||
      strcasecmp(current, want.c_str()) == 0 ||
      std::getenv(kReexecGuard) != nullptr) {
    return;
  }
  ::setenv("OPENBLAS_CORETYPE", want.c_str(), 1);
  ::setenv(kReexecGuard, want.c_str(), 1);
  ::execv("/proc/self/exe", argv);
  std::fprintf(stderr,
               "switchyard: cannot re-execute with %s BLAS kernels; using %s\n",
               want.c_str(), current);
}

}  // namespace switchyard::expert_worker
