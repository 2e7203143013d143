#include "common/logging.h"

#include <glog/logging.h>

#include <cstdlib>
#include <mutex>

namespace switchyard {

void InitLogging(const char* argv0) {
  static std::once_flag once;
  std::call_once(once, [argv0] {
    FLAGS_logtostderr = true;
    FLAGS_colorlogtostderr = false;
    if (const char* v = std::getenv("SWITCHYARD_LOG_VERBOSITY")) {
      FLAGS_v = std::atoi(v);
    }
    google::InitGoogleLogging(argv0);
  });
}

}  // namespace switchyard
