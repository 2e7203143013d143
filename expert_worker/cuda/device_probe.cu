// CUDA build of the device probe; cudaError_t becomes a reason string here.
#include <cuda_runtime.h>

#include "expert_worker/cuda/device_probe.h"

namespace switchyard::expert_worker {

int CudaDeviceCount(std::string* why) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    *why = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err);
    return 0;
  }
  if (count == 0) *why = "no CUDA devices are visible";
  return count;
}

}  // namespace switchyard::expert_worker
