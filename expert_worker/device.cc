#include <cstdlib>

#include "expert_worker/cuda/device_probe.h"

namespace switchyard::expert_worker {

Status CheckDevice(const std::string& device) {
  if (device == "cpu") return OkStatus();
  if (device.rfind("cuda:", 0) == 0) {
    char* end = nullptr;
    const long index = std::strtol(device.c_str() + 5, &end, 10);
    if (end == device.c_str() + 5 || *end != '\0' || index < 0) {
      return InvalidArgumentError("device '" + device +
                                  "' is not cpu or cuda:N");
    }
    std::string why;
    const int count = CudaDeviceCount(&why);
    if (index >= count) {
      return FailedPreconditionError(
          "device '" + device + "' requested but " + std::to_string(count) +
          " CUDA device(s) are usable" + (why.empty() ? "" : ": " + why));
    }
    return OkStatus();
  }
  return InvalidArgumentError("device '" + device + "' is not cpu or cuda:N");
}

}  // namespace switchyard::expert_worker
