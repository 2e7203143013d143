#include "common/thread_name.h"

#include <gtest/gtest.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <thread>

namespace switchyard {
namespace {

// What the kernel shows for the calling thread.
std::string KernelName() {
  const long tid = syscall(SYS_gettid);
  std::ifstream comm("/proc/self/task/" + std::to_string(tid) + "/comm");
  std::string name;
  std::getline(comm, name);
  return name;
}

// The name the kernel shows for a thread that named itself `name`.
std::string NameSeenFor(const std::string& name) {
  std::string seen;
  std::thread([&] {
    NameThisThread(name);
    seen = KernelName();
  }).join();
  return seen;
}

TEST(ThreadNameTest, TheKernelShowsTheName) {
  EXPECT_EQ(NameSeenFor("sy-ckpt"), "sy-ckpt");
}

TEST(ThreadNameTest, ALongNameIsCutTo15Bytes) {
  EXPECT_EQ(NameSeenFor("sy-a-name-longer-than-fifteen"), "sy-a-name-longe");
}

}  // namespace
}  // namespace switchyard
