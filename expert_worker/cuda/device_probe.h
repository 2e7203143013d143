// Which CUDA devices this process can use. Built with nvcc when the CUDA
// toolkit is present (SWITCHYARD_CUDA); otherwise reports none.
#ifndef SWITCHYARD_EXPERT_WORKER_CUDA_DEVICE_PROBE_H_
#define SWITCHYARD_EXPERT_WORKER_CUDA_DEVICE_PROBE_H_

#include <string>

#include "common/status.h"

namespace switchyard::expert_worker {

// Number of usable CUDA devices; 0 when none (or no CUDA build), with the
// reason in *why.
int CudaDeviceCount(std::string* why);

// Validates a device string: "cpu" or "cuda:N" with N a present device.
Status CheckDevice(const std::string& device);

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_CUDA_DEVICE_PROBE_H_
