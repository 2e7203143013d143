// Linked into every test binary: process-wide set-up that must happen
// before a test starts threads.
#include <ctime>

namespace switchyard::testing {
namespace {

// glog reads the time zone for every message (localtime, mktime). glibc
// keeps its time-zone state under a lock of its own that ThreadSanitizer
// cannot see, and rewrites it at every mktime unless TZ is set (`make tsan`
// sets TZ=UTC). Set once here, on the main thread, before any test starts
// threads, that state is only read afterwards (TSan reported tzset_internal
// racing between two threads' log lines in transport_test).
[[maybe_unused]] const bool time_zone_set = [] {
  tzset();
  return true;
}();

}  // namespace
}  // namespace switchyard::testing
