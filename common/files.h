// Whole-file reads, for the small files that processes hand each other
// (addresses, routing tables, results) and that tests read back (logs,
// documents). Header-only, so that tests and bench/ can use it without
// linking anything new. Thread-safe (no shared state).
#ifndef SWITCHYARD_COMMON_FILES_H_
#define SWITCHYARD_COMMON_FILES_H_

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include "common/status.h"

namespace switchyard {

// The bytes of the file at `path`. NOT_FOUND (with the system's reason) if
// it cannot be opened; UNAVAILABLE if reading it fails part way.
inline StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return NotFoundError("cannot open '" + path + "': " + std::strerror(errno));
  }
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) return UnavailableError("cannot read '" + path + "'");
  return bytes.str();
}

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_FILES_H_
