// Chunk files written with direct I/O (docs/checkpoint_format.md, "Getting
// to disk").
//
// SstFileWriter writes through the page cache: on the CI VM that moved
// about 1 GB/s where O_DIRECT writes of 16 MiB from a huge-page buffer
// moved 1.2-1.6 GB/s (bench/checkpoint). DirectWriteEnv is the default
// Env except that files whose names end in kDirectWriteSuffix (the store's
// chunk files, before ingestion) gather appends in a 16 MiB huge-page
// buffer and go to disk in O_DIRECT writes of that size. Sync and Close
// write the unaligned tail padded and cut the file to its size. Where the
// file system refuses O_DIRECT, those files are written as usual.
#ifndef SWITCHYARD_STORAGE_DIRECT_WRITE_FS_H_
#define SWITCHYARD_STORAGE_DIRECT_WRITE_FS_H_

#include <rocksdb/env.h>
#include <rocksdb/file_system.h>

#include <memory>

namespace switchyard::storage {

inline constexpr char kDirectWriteSuffix[] = ".chunks.sst";

// Process-wide; never destroyed. DirectWriteEnv is the default Env over
// DirectWriteFileSystem.
rocksdb::Env* DirectWriteEnv();
const std::shared_ptr<rocksdb::FileSystem>& DirectWriteFileSystem();

}  // namespace switchyard::storage

#endif  // SWITCHYARD_STORAGE_DIRECT_WRITE_FS_H_
