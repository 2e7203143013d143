// Device probe for builds without CUDA.
#include "expert_worker/cuda/device_probe.h"

namespace switchyard::expert_worker {

int CudaDeviceCount(std::string* why) {
  *why = "this build has no CUDA support (SWITCHYARD_CUDA=OFF or no nvcc)";
  return 0;
}

}  // namespace switchyard::expert_worker
