#include "common/thread_name.h"

#include <pthread.h>

#include <string>

namespace switchyard {

void NameThisThread(std::string_view name) {
  constexpr size_t kMaxName = 15;  // TASK_COMM_LEN less the terminator.
  const std::string cut(name.substr(0, kMaxName));
  // Fails only for a name too long, which the cut rules out.
  (void)pthread_setname_np(pthread_self(), cut.c_str());
}

}  // namespace switchyard
