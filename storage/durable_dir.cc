// Durable directory creation: see durable_dir.h.
#include "storage/durable_dir.h"

#include <glog/logging.h>

#include <filesystem>
#include <map>
#include <vector>

namespace switchyard::storage {
namespace {

rocksdb::IOStatus SyncDir(rocksdb::FileSystem& fs, const std::string& dir) {
  const rocksdb::IOOptions io;
  std::unique_ptr<rocksdb::FSDirectory> d;
  rocksdb::IOStatus s = fs.NewDirectory(dir, io, &d, nullptr);
  if (s.ok()) s = d->Fsync(io, nullptr);
  if (s.ok()) s = d->Close(io, nullptr);
  return s;
}

}  // namespace

Status CreateDirDurably(rocksdb::FileSystem& fs, const std::string& path) {
  const rocksdb::IOOptions io;
  const std::filesystem::path target =
      std::filesystem::path(path).lexically_normal();
  // The missing directories, deepest first.
  std::vector<std::filesystem::path> missing;
  for (auto p = target; !p.empty() && p != p.root_path(); p = p.parent_path()) {
    if (fs.FileExists(p.string(), io, nullptr).ok()) break;
    missing.push_back(p);
  }
  // Directories to fsync -> whether they hold one this call created.
  std::map<std::string, bool> parents = {
      {target.parent_path().string(), false}};
  for (auto p = missing.rbegin(); p != missing.rend(); ++p) {
    const rocksdb::IOStatus s = fs.CreateDirIfMissing(p->string(), io, nullptr);
    if (!s.ok()) {
      return UnavailableError("cannot create directory " + p->string() + ": " +
                              s.ToString());
    }
    parents[p->parent_path().string()] = true;
  }
  for (const auto& [parent, holds_new] : parents) {
    if (parent.empty()) continue;  // A relative path's ".": not ours.
    const rocksdb::IOStatus s = SyncDir(fs, parent);
    if (s.ok()) continue;
    if (holds_new) {
      return UnavailableError("cannot sync directory " + parent + ": " +
                              s.ToString());
    }
    // NOTE: an existing directory was most likely made durable when it was
    // created; a parent we may not read (mode 711) must not stop a store
    // from opening.
    LOG(WARNING) << "cannot sync directory " << parent << " (" << s.ToString()
                 << "); " << target.string() << " may not survive a power loss";
  }
  return OkStatus();
}

}  // namespace switchyard::storage
