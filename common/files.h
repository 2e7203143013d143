// Whole-file reads, for the small files that processes hand each other
// (addresses, routing tables, results) and that tests read back (logs,
// documents). Header-only, so that tests and bench/ can use it without
// linking anything new. Thread-safe (no shared state).
#ifndef SWITCHYARD_COMMON_FILES_H_
#define SWITCHYARD_COMMON_FILES_H_

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>

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

// The size of the regular file at `path` (symbolic links followed).
// NOT_FOUND if there is nothing there; INVALID_ARGUMENT naming what is there
// instead (a directory, a character device such as /dev/zero, a FIFO ...),
// so that a reader never blocks on a FIFO or reads a device without end.
inline StatusOr<uint64_t> RegularFileSize(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || st.type() == fs::file_type::not_found) {
    return NotFoundError("cannot open '" + path +
                         "': " + (ec ? ec.message() : "no such file"));
  }
  const char* kind = nullptr;
  switch (st.type()) {
    case fs::file_type::regular:
      break;
    case fs::file_type::directory:
      kind = "a directory";
      break;
    case fs::file_type::character:
      kind = "a character device";
      break;
    case fs::file_type::block:
      kind = "a block device";
      break;
    case fs::file_type::fifo:
      kind = "a FIFO";
      break;
    case fs::file_type::socket:
      kind = "a socket";
      break;
    default:
      kind = "of an unknown kind";
      break;
  }
  if (kind != nullptr) {
    return InvalidArgumentError("'" + path + "' is " + kind +
                                ", not a regular file");
  }
  const uintmax_t size = fs::file_size(path, ec);
  if (ec) {
    return NotFoundError("cannot read the size of '" + path +
                         "': " + ec.message());
  }
  return static_cast<uint64_t>(size);
}

// ReadFileToString for a regular file of at most `max_bytes` (INVALID_
// ARGUMENT beyond, and as RegularFileSize).
inline StatusOr<std::string> ReadRegularFile(const std::string& path,
                                             uint64_t max_bytes) {
  auto size = RegularFileSize(path);
  if (!size.ok()) return size.status();
  if (*size > max_bytes) {
    return InvalidArgumentError("'" + path + "' has " + std::to_string(*size) +
                                " bytes, more than the " +
                                std::to_string(max_bytes) + " expected");
  }
  return ReadFileToString(path);
}

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_FILES_H_
