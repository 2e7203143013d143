// Durable directory creation: see durable_dir.h.
#include "storage/durable_dir.h"

#include <filesystem>
#include <set>
#include <vector>

namespace switchyard::storage {
namespace {

Status Unavailable(const std::string& what, const rocksdb::IOStatus& s) {
  return UnavailableError(what + ": " + s.ToString());
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
  std::set<std::string> parents = {target.parent_path().string()};
  for (auto p = missing.rbegin(); p != missing.rend(); ++p) {
    const rocksdb::IOStatus s = fs.CreateDirIfMissing(p->string(), io, nullptr);
    if (!s.ok())
      return Unavailable("cannot create directory " + p->string(), s);
    parents.insert(p->parent_path().string());
  }
  for (const std::string& parent : parents) {
    if (parent.empty()) continue;  // A relative path's ".": not ours.
    std::unique_ptr<rocksdb::FSDirectory> dir;
    rocksdb::IOStatus s = fs.NewDirectory(parent, io, &dir, nullptr);
    if (s.ok()) s = dir->Fsync(io, nullptr);
    if (s.ok()) s = dir->Close(io, nullptr);
    if (!s.ok()) return Unavailable("cannot sync directory " + parent, s);
  }
  return OkStatus();
}

}  // namespace switchyard::storage
