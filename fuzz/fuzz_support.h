// Helpers shared by the fuzzers (fuzz/): quiet logging, a private temp
// directory, and a check that aborts like a sanitizer report.
//
// Every fuzzer is deterministic (no clocks, no random seeds: anything that
// varies comes from the input) and writes only inside TempDir(), which is
// removed when the process exits normally.
#ifndef SWITCHYARD_FUZZ_FUZZ_SUPPORT_H_
#define SWITCHYARD_FUZZ_FUZZ_SUPPORT_H_

#include <glog/logging.h>
#include <google/protobuf/stubs/logging.h>
#include <stdlib.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace switchyard::fuzz {

// Logs only errors (a fuzzer's inputs make every warning path speak), and
// of protobuf's only fatal ones (it logs an error for every string field
// that is not UTF-8, millions in a run); LOG(FATAL) and CHECK still abort,
// and a fuzzer reports that as a crash.
inline void QuietLogging() {
  FLAGS_logtostderr = true;
  FLAGS_minloglevel = google::GLOG_ERROR;
  google::protobuf::SetLogHandler([](google::protobuf::LogLevel level,
                                     const char* file, int line,
                                     const std::string& message) {
    if (level >= google::protobuf::LOGLEVEL_FATAL) {
      std::fprintf(stderr, "[libprotobuf FATAL %s:%d] %s\n", file, line,
                   message.c_str());
    }
  });
}

// A directory of this process's own under $TMPDIR (default /tmp), created
// on first use and removed at exit.
inline const std::string& TempDir() {
  static const std::string* dir = [] {
    const char* base = std::getenv("TMPDIR");
    std::string pattern =
        std::string(base != nullptr && *base ? base : "/tmp") +
        "/switchyard-fuzz-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      std::perror("mkdtemp");
      std::abort();
    }
    auto* d = new std::string(pattern);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(TempDir(), ec);
    });
    return d;
  }();
  return *dir;
}

}  // namespace switchyard::fuzz

// An invariant of the code under test: a failure is a finding, reported
// with the condition and aborting (libFuzzer saves the input).
#define FUZZ_CHECK(cond)                                               \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", __FILE__, \
                   __LINE__, #cond);                                   \
      std::abort();                                                    \
    }                                                                  \
  } while (0)

#endif  // SWITCHYARD_FUZZ_FUZZ_SUPPORT_H_
