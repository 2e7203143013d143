// Process-wide logging set-up (glog to stderr).
#ifndef SWITCHYARD_COMMON_LOGGING_H_
#define SWITCHYARD_COMMON_LOGGING_H_

namespace switchyard {

// Initialises glog once: logs go to stderr, with the program name from argv0.
// The environment variable SWITCHYARD_LOG_VERBOSITY sets glog's -v level.
void InitLogging(const char* argv0);

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_LOGGING_H_
