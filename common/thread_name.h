// Names for the threads a process starts, as `top -H`, `perf`, `gdb` and
// /proc/PID/task/TID/comm show them.
#pragma once

#include <string>
#include <string_view>
#include <thread>
#include <utility>

namespace switchyard {

// Names the calling thread. Linux keeps 15 bytes; a longer name is cut.
// Every long-lived thread is named "sy-<role>" (docs/operations.md lists
// them).
void NameThisThread(std::string_view name);

// A thread that names itself `name`, then runs `body`.
template <typename Body>
std::thread StartNamedThread(std::string name, Body&& body) {
  return std::thread(
      [name = std::move(name), body = std::forward<Body>(body)]() mutable {
        NameThisThread(name);
        body();
      });
}

}  // namespace switchyard
