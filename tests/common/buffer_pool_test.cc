#include "common/buffer_pool.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

namespace switchyard {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

// The mapping (from /proc/self/smaps) that holds `p`: its range and its
// AnonHugePages in KiB. False when no mapping holds it.
struct Mapping {
  uintptr_t start = 0;
  uintptr_t end = 0;
  uint64_t huge_kib = 0;
};
bool FindMapping(const void* p, Mapping* out) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(p);
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool in = false;
  while (std::getline(smaps, line)) {
    uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream range(line);
    if (range >> std::hex >> lo >> dash >> hi && dash == '-' &&
        line.find(':') > line.find(' ')) {
      in = lo <= at && at < hi;
      if (in) *out = Mapping{lo, hi, 0};
    } else if (in && line.rfind("AnonHugePages:", 0) == 0) {
      out->huge_kib = std::stoull(line.substr(14));
      return true;
    }
  }
  return false;
}

std::string TransparentHugePages() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string mode;
  std::getline(f, mode);
  return mode;
}

TEST(BufferPoolTest, ReturnedBuffersAreReusedUpToTheCap) {
  auto pool = BufferPool::Create(64 << 10);
  void* first = nullptr;
  {
    auto t = pool->Take(DType::kF32, {1000});
    ASSERT_TRUE(t.ok());
    first = t->data();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % 64, 0u);
  }
  EXPECT_EQ(pool->cached_bytes(), BufferPool::ClassBytes(4000));
  auto again = pool->Take(DType::kF32, {900});  // The same size class.
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->data(), first);
  EXPECT_EQ(pool->cached_bytes(), 0u);
  {
    // Over the cap: released, not kept.
    auto big = pool->Take(DType::kF32, {32 << 10});
    ASSERT_TRUE(big.ok());
  }
  EXPECT_EQ(pool->cached_bytes(), 0u);
}

// Buffers of 2 MiB and more are mappings of their own, 2 MiB aligned and
// on transparent huge pages once touched (where the kernel offers them):
// O_DIRECT reads into 4 KiB pages cost several times more on the CI VM
// (docs/performance.md). A released one is unmapped.
TEST(BufferPoolTest, LargeBuffersAreHugePageMappingsOfTheirOwn) {
  // Heap memory already touched, as a long-running process has: freeing
  // a large block raises glibc's mmap threshold above 4 MiB, and the
  // touched 6 MiB stays in the heap on 4 KiB pages, where a 4 MiB
  // allocation from the heap would land.
  std::free(std::malloc(size_t{16} << 20));
  void* touched = std::malloc(size_t{6} << 20);
  ASSERT_NE(touched, nullptr);
  std::memset(touched, 1, size_t{6} << 20);
  std::free(touched);
  auto pool = BufferPool::Create(0);
  const size_t bytes = size_t{4} << 20;
  uintptr_t start = 0;
  {
    auto t = pool->Take(DType::kF32, {static_cast<int64_t>(bytes / 4)});
    ASSERT_TRUE(t.ok());
    start = reinterpret_cast<uintptr_t>(t->data());
    EXPECT_EQ(start % kHugePage, 0u);
    std::memset(t->data(), 1, bytes);
    Mapping m;
    ASSERT_TRUE(FindMapping(t->data(), &m));
    EXPECT_LE(m.start, start);
    EXPECT_GE(m.end, start + bytes);
    const std::string mode = TransparentHugePages();
    if (mode.find("[never]") == std::string::npos) {
      EXPECT_GT(m.huge_kib, 0u) << "transparent huge pages: " << mode;
    }
  }
  Mapping after;
  EXPECT_FALSE(FindMapping(reinterpret_cast<void*>(start), &after) &&
               after.start <= start && after.end >= start + bytes)
      << "a released buffer is still mapped";
}

}  // namespace
}  // namespace switchyard
