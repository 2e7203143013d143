#include "expert_worker/cpu/blas_kernels.h"

#include <cblas.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace switchyard::expert_worker {

const char* BlasKernelName() { return openblas_get_corename(); }

void SelectBlasKernels(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  const bool avx512 =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd");
  const char* current = openblas_get_corename();
  if (!avx512 || current == nullptr ||
      std::strstr(current, "Skylake") != nullptr ||
      std::strstr(current, "Cooperlake") != nullptr ||
      std::strstr(current, "SapphireRapids") != nullptr) {
    return;
  }
  ::setenv("OPENBLAS_CORETYPE", "SkylakeX", 1);
  ::execv("/proc/self/exe", argv);
  // exec failed: go on with the kernels already loaded.
  std::fprintf(stderr,
               "switchyard: cannot re-execute with SkylakeX BLAS kernels; "
               "using %s\n",
               current);
}

}  // namespace switchyard::expert_worker
