// RocksDB statuses as Status: the one conversion, used by every store.
#ifndef SWITCHYARD_STORAGE_ROCKS_STATUS_H_
#define SWITCHYARD_STORAGE_ROCKS_STATUS_H_

#include <rocksdb/status.h>

#include <string>

#include "common/status.h"

namespace switchyard::storage {

inline Status RocksStatus(const rocksdb::Status& s, const std::string& what,
                          const char* file, int line) {
  if (s.ok()) return OkStatus();
  const std::string msg = what + ": " + s.ToString() + " [" + file + ":" +
                          std::to_string(line) + "]";
  if (s.IsNotFound()) return NotFoundError(msg);
  if (s.IsCorruption()) return DataLossError(msg);
  if (s.IsInvalidArgument()) return InvalidArgumentError(msg);
  if (s.IsNoSpace()) return ResourceExhaustedError(msg);
  if (s.IsBusy() || s.IsTimedOut() || s.IsTryAgain()) {
    return UnavailableError(msg);
  }
  return InternalError(msg);
}

}  // namespace switchyard::storage

#define ROCKS_STATUS(s, what) \
  ::switchyard::storage::RocksStatus((s), (what), __FILE__, __LINE__)

#endif  // SWITCHYARD_STORAGE_ROCKS_STATUS_H_
