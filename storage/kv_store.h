// A small ordered key-value store interface over RocksDB.
//
// The seam that tests wrap to inject faults (STYLE.md 8). Keys and values are
// byte strings; Write applies a batch atomically. Implementations are
// thread-safe.
#ifndef SWITCHYARD_STORAGE_KV_STORE_H_
#define SWITCHYARD_STORAGE_KV_STORE_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace rocksdb {
class FileSystem;
}  // namespace rocksdb

namespace switchyard::storage {

struct WriteBatchOp {
  enum class Kind { kPut, kDelete, kDeleteRange };
  Kind kind = Kind::kPut;
  std::string key;
  std::string value;  // Put: the value. DeleteRange: the exclusive end key.
};

class KvStore {
 public:
  virtual ~KvStore() = default;

  // Applies `ops` atomically. With `sync`, returns only once the batch is on
  // stable storage (survives power loss).
  virtual Status Write(const std::vector<WriteBatchOp>& ops, bool sync) = 0;
  // The value at `key`, or nullopt when absent.
  virtual StatusOr<std::optional<std::string>> Get(const std::string& key) = 0;
  // Calls `fn(key, value)` for every key starting with `prefix`, in order.
  virtual Status ScanPrefix(
      const std::string& prefix,
      const std::function<void(const std::string&, const std::string&)>&
          fn) = 0;

  Status Put(const std::string& key, const std::string& value, bool sync) {
    return Write({{WriteBatchOp::Kind::kPut, key, value}}, sync);
  }
};

// Opens (creating if missing) a RocksDB database in directory `path`, its
// files through `file_system` (null: the default; tests inject faults).
StatusOr<std::unique_ptr<KvStore>> OpenRocksKvStore(
    const std::string& path,
    std::shared_ptr<rocksdb::FileSystem> file_system = nullptr);
// Opens an existing database for reading, even while a process has it open
// for writing (it sees what was durable when it opened). Write fails.
StatusOr<std::unique_ptr<KvStore>> OpenRocksKvStoreReadOnly(
    const std::string& path);

}  // namespace switchyard::storage

#endif  // SWITCHYARD_STORAGE_KV_STORE_H_
