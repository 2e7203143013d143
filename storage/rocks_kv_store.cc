// KvStore on RocksDB.
#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/file_system.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include "storage/durable_dir.h"
#include "storage/kv_store.h"
#include "storage/rocks_status.h"

namespace switchyard::storage {
namespace {

class RocksKvStore : public KvStore {
 public:
  // `env`, when not null, is the Env `db` was opened with.
  RocksKvStore(std::unique_ptr<rocksdb::Env> env,
               std::unique_ptr<rocksdb::DB> db)
      : env_(std::move(env)), db_(std::move(db)) {}

  Status Write(const std::vector<WriteBatchOp>& ops, bool sync) override {
    rocksdb::WriteBatch batch;
    for (const WriteBatchOp& op : ops) {
      switch (op.kind) {
        case WriteBatchOp::Kind::kPut:
          batch.Put(op.key, op.value);
          break;
        case WriteBatchOp::Kind::kDelete:
          batch.Delete(op.key);
          break;
        case WriteBatchOp::Kind::kDeleteRange:
          batch.DeleteRange(op.key, op.value);
          break;
      }
    }
    rocksdb::WriteOptions options;
    options.sync = sync;
    return ROCKS_STATUS(db_->Write(options, &batch), "rocksdb write");
  }

  StatusOr<std::optional<std::string>> Get(const std::string& key) override {
    std::string value;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), key, &value);
    if (s.IsNotFound()) return std::optional<std::string>();
    RETURN_IF_ERROR(ROCKS_STATUS(s, "rocksdb get " + key));
    return std::optional<std::string>(std::move(value));
  }

  Status ScanPrefix(
      const std::string& prefix,
      const std::function<void(const std::string&, const std::string&)>& fn)
      override {
    std::unique_ptr<rocksdb::Iterator> it(
        db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix);
         it->Next()) {
      fn(it->key().ToString(), it->value().ToString());
    }
    return ROCKS_STATUS(it->status(), "rocksdb scan " + prefix);
  }

 private:
  const std::unique_ptr<rocksdb::Env> env_;  // Outlives db_.
  std::unique_ptr<rocksdb::DB> db_;
};

}  // namespace

StatusOr<std::unique_ptr<KvStore>> OpenRocksKvStore(
    const std::string& path, std::shared_ptr<rocksdb::FileSystem> file_system) {
  std::unique_ptr<rocksdb::Env> env;
  if (file_system != nullptr) env = rocksdb::NewCompositeEnv(file_system);
  // The directory survives power loss before anything is written in it
  // (RocksDB does not sync the parent of the database directory).
  RETURN_IF_ERROR(CreateDirDurably(
      file_system != nullptr ? *file_system : *rocksdb::FileSystem::Default(),
      path));
  rocksdb::Options options;
  if (env != nullptr) options.env = env.get();
  options.create_if_missing = true;
  options.paranoid_checks = true;
  rocksdb::DB* raw = nullptr;
  RETURN_IF_ERROR(
      ROCKS_STATUS(rocksdb::DB::Open(options, path, &raw), "open " + path));
  return std::unique_ptr<KvStore>(
      new RocksKvStore(std::move(env), std::unique_ptr<rocksdb::DB>(raw)));
}

StatusOr<std::unique_ptr<KvStore>> OpenRocksKvStoreReadOnly(
    const std::string& path) {
  rocksdb::Options options;
  options.paranoid_checks = true;
  rocksdb::DB* raw = nullptr;
  RETURN_IF_ERROR(ROCKS_STATUS(
      rocksdb::DB::OpenForReadOnly(options, path, &raw), "open " + path));
  return std::unique_ptr<KvStore>(
      new RocksKvStore(nullptr, std::unique_ptr<rocksdb::DB>(raw)));
}

}  // namespace switchyard::storage
