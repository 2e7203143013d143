// A RocksDB FileSystem that simulates power loss, for tests (STYLE.md 8;
// after leveldb's FaultInjectionTestEnv and RocksDB's FaultInjectionTestFS,
// much smaller).
//
// It wraps a real FileSystem: every write reaches the disk as usual, and it
// remembers what a power loss would take back. Per file: the bytes appended
// since the last Sync or Fsync. Per directory: the names created (files,
// hard links, directories) and renamed since the directory's last fsync
// (FSDirectory::Fsync). The test cuts the power before the n-th mutating
// operation (CutPowerAt) or at once (CutPowerNow): that operation and every
// later one fail with IOError "simulated power loss" and change nothing.
// The test then closes what ran on it (the database) and calls
// DropUnsyncedData, which leaves on disk what a power loss would: every
// tracked file cut to its last synced size, then the unsynced name changes
// undone, newest first (created names removed, renames moved back, a file
// a rename replaced written back). A store then reopened over the default
// FileSystem sees the files as after a reboot.
//
// Counted as one operation each: a file's Append, PositionedAppend,
// Truncate, Sync, Fsync and RangeSync; creating or reopening a file for
// writing; RenameFile, LinkFile, DeleteFile, FileSystem::Truncate,
// CreateDir(IfMissing), DeleteDir; a directory's Fsync. Flush fails once the
// power is cut but is not counted; Close always goes through (descriptors are
// released), and the bytes it writes are dropped like any unsynced ones.
//
// NOTE: the model is POSIX's, stricter than ext4's journal, except where
// it is looser (deletions, untracked files):
// - RangeSync (sync_file_range) makes nothing durable: it writes pages back
//   but neither the file's size nor the disk cache.
// - A new name needs an fsync of its directory, also for a file that was
//   itself fsynced, and a new directory an fsync of its parent.
// - A rename is undone unless the target's directory was fsynced after it
//   (the source directory is not considered).
// - Deletions are durable at once (a deleted file never comes back).
// - Only what goes through this FileSystem is seen: files written with
//   std::filesystem or stdio are not tracked (they survive whole).
// - NewRandomRWFile and ReuseWritableFile are refused (NotSupported).
//
// Thread-safe: one mutex serializes every tracked operation, the call to
// the wrapped FileSystem included.
#ifndef SWITCHYARD_TESTS_TESTING_POWER_LOSS_FS_H_
#define SWITCHYARD_TESTS_TESTING_POWER_LOSS_FS_H_

#include <rocksdb/file_system.h>

#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/mutex.h"
#include "common/status.h"
#include "common/thread_annotations.h"

namespace switchyard::testing {

class PowerLossFileSystem : public rocksdb::FileSystemWrapper {
 public:
  explicit PowerLossFileSystem(std::shared_ptr<rocksdb::FileSystem> target);
  const char* Name() const override { return "SwitchyardPowerLoss"; }

  // Mutating operations attempted so far (counted as in the file comment),
  // refused ones included.
  uint64_t operations() const;
  // Operation number `n` (0-based) and every later one are refused.
  void CutPowerAt(uint64_t n);
  // The next operation and every later one are refused.
  void CutPowerNow();
  // Whether the next operation would be refused.
  bool power_cut() const;
  // The first refused operation ("sync /tmp/x/db/000012.log"), "" if none.
  std::string first_refused() const;

  // Leaves on disk what a power loss would (file comment). Precondition:
  // every file written through this FileSystem is closed. Afterwards what is
  // on disk counts as durable, the count starts at 0 and the power is on.
  Status DropUnsyncedData();

  rocksdb::IOStatus NewWritableFile(
      const std::string& path, const rocksdb::FileOptions& options,
      std::unique_ptr<rocksdb::FSWritableFile>* result,
      rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus ReopenWritableFile(
      const std::string& path, const rocksdb::FileOptions& options,
      std::unique_ptr<rocksdb::FSWritableFile>* result,
      rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus ReuseWritableFile(
      const std::string& path, const std::string& old_path,
      const rocksdb::FileOptions& options,
      std::unique_ptr<rocksdb::FSWritableFile>* result,
      rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus NewRandomRWFile(
      const std::string& path, const rocksdb::FileOptions& options,
      std::unique_ptr<rocksdb::FSRandomRWFile>* result,
      rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus NewDirectory(const std::string& path,
                                 const rocksdb::IOOptions& options,
                                 std::unique_ptr<rocksdb::FSDirectory>* result,
                                 rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus DeleteFile(const std::string& path,
                               const rocksdb::IOOptions& options,
                               rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus Truncate(const std::string& path, size_t size,
                             const rocksdb::IOOptions& options,
                             rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus CreateDir(const std::string& path,
                              const rocksdb::IOOptions& options,
                              rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus CreateDirIfMissing(const std::string& path,
                                       const rocksdb::IOOptions& options,
                                       rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus DeleteDir(const std::string& path,
                              const rocksdb::IOOptions& options,
                              rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus RenameFile(const std::string& from, const std::string& to,
                               const rocksdb::IOOptions& options,
                               rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus LinkFile(const std::string& from, const std::string& to,
                             const rocksdb::IOOptions& options,
                             rocksdb::IODebugContext* dbg) override;

 private:
  friend class PowerLossWritableFile;
  friend class PowerLossDirectory;

  // A file's bytes: appended, and durable (synced). Shared by hard links.
  struct FileState {
    uint64_t size = 0;
    uint64_t synced = 0;
  };
  // A name change that an fsync of `dir` makes durable.
  struct NameChange {
    enum class Kind { kCreated, kDirCreated, kRenamed };
    Kind kind = Kind::kCreated;
    std::string dir;
    std::string path;  // The new name.
    std::string from;  // kRenamed: the old name.
    // kRenamed: the durable bytes of the file that `path` named before.
    std::optional<std::string> replaced;
  };

  // Counts one operation, described by `what`: OK, or the power-loss error
  // (nothing may change then).
  rocksdb::IOStatus Admit(const std::string& what) REQUIRES(mu_);
  // Opens a file for writing (`reopen`: keeping its bytes) and tracks it.
  rocksdb::IOStatus OpenForWrite(
      const std::string& path, const rocksdb::FileOptions& options, bool reopen,
      std::unique_ptr<rocksdb::FSWritableFile>* result,
      rocksdb::IODebugContext* dbg);
  rocksdb::IOStatus CreateDirectory(const std::string& path, bool if_missing,
                                    const rocksdb::IOOptions& options,
                                    rocksdb::IODebugContext* dbg);
  // `dir` was fsynced: its name changes are durable.
  void DirectorySynced(const std::string& dir) REQUIRES(mu_);
  bool Exists(const std::string& path);

  mutable Mutex mu_;
  uint64_t operations_ GUARDED_BY(mu_) = 0;
  uint64_t cut_at_ GUARDED_BY(mu_) = std::numeric_limits<uint64_t>::max();
  std::string first_refused_ GUARDED_BY(mu_);
  // By path.
  std::map<std::string, std::shared_ptr<FileState>> files_ GUARDED_BY(mu_);
  // Not yet durable, oldest first.
  std::vector<NameChange> journal_ GUARDED_BY(mu_);
};

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_TESTING_POWER_LOSS_FS_H_
