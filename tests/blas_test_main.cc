// gtest main for tests that compute with OpenBLAS: the same kernel choice as
// every switchyard process (expert_worker/cpu/blas_kernels.h), so in-process
// references and multi-process runs agree bit for bit.
#include <gtest/gtest.h>

#include "common/logging.h"
#include "expert_worker/cpu/blas_kernels.h"

int main(int argc, char** argv) {
  switchyard::expert_worker::SelectBlasKernels(argv);
  switchyard::InitLogging(argv[0]);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
