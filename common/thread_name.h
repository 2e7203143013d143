// Names for the threads a process starts, as `top -H`, `perf`, `gdb` and
// /proc/PID/task/TID/comm show them.
#pragma once

#include <string_view>

namespace switchyard {

// Names the calling thread. Linux keeps 15 bytes; a longer name is cut.
// Every long-lived thread is named "sy-<role>" (docs/operations.md lists
// them).
void NameThisThread(std::string_view name);

}  // namespace switchyard
