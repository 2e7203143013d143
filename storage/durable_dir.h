// Directories that survive power loss: a new directory's name is durable
// only once its parent directory is fsynced (RocksDB syncs the directories
// it writes files into, not the parent of a database directory it creates).
#ifndef SWITCHYARD_STORAGE_DURABLE_DIR_H_
#define SWITCHYARD_STORAGE_DURABLE_DIR_H_

#include <rocksdb/file_system.h>

#include <string>

#include "common/status.h"

namespace switchyard::storage {

// Creates directory `path` and its missing parents through `fs`, then
// fsyncs the parent of `path` and of every directory it created, whether
// or not `path` existed (a process killed after creating it may not have
// synced it). UNAVAILABLE naming the directory when it cannot create one or
// sync the parent of one it created; a parent of an existing directory that
// cannot be synced is logged.
Status CreateDirDurably(rocksdb::FileSystem& fs, const std::string& path);

}  // namespace switchyard::storage

#endif  // SWITCHYARD_STORAGE_DURABLE_DIR_H_
