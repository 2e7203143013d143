// Simulated power loss under RocksDB: see power_loss_fs.h.
#include "tests/testing/power_loss_fs.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>

namespace switchyard::testing {
namespace {

namespace fs = std::filesystem;

std::string Normal(const std::string& path) {
  std::string p = fs::path(path).lexically_normal().string();
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}
std::string Parent(const std::string& path) {
  return fs::path(path).parent_path().string();
}
bool Under(const std::string& path, const std::string& dir) {
  return path.size() > dir.size() && path.compare(0, dir.size(), dir) == 0 &&
         path[dir.size()] == '/';
}

}  // namespace

// A file open for writing: counts its operations and tracks its bytes.
class PowerLossWritableFile : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  using State = PowerLossFileSystem::FileState;
  PowerLossWritableFile(PowerLossFileSystem* fs, std::string path,
                        std::shared_ptr<State> state,
                        std::unique_ptr<rocksdb::FSWritableFile> file)
      : FSWritableFileOwnerWrapper(std::move(file)),
        fs_(fs),
        path_(std::move(path)),
        state_(std::move(state)) {}

  rocksdb::IOStatus Append(const rocksdb::Slice& data,
                           const rocksdb::IOOptions& options,
                           rocksdb::IODebugContext* dbg) override {
    MutexLock lock(&fs_->mu_);
    rocksdb::IOStatus s = fs_->Admit("append " + path_);
    if (s.ok()) s = target()->Append(data, options, dbg);
    if (s.ok()) state_->size += data.size();
    return s;
  }
  rocksdb::IOStatus Append(const rocksdb::Slice& data,
                           const rocksdb::IOOptions& options,
                           const rocksdb::DataVerificationInfo& /*info*/,
                           rocksdb::IODebugContext* dbg) override {
    return Append(data, options, dbg);
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data,
                                     uint64_t offset,
                                     const rocksdb::IOOptions& options,
                                     rocksdb::IODebugContext* dbg) override {
    MutexLock lock(&fs_->mu_);
    rocksdb::IOStatus s = fs_->Admit("positioned append " + path_);
    if (s.ok()) s = target()->PositionedAppend(data, offset, options, dbg);
    if (s.ok()) state_->size = std::max(state_->size, offset + data.size());
    return s;
  }
  rocksdb::IOStatus PositionedAppend(
      const rocksdb::Slice& data, uint64_t offset,
      const rocksdb::IOOptions& options,
      const rocksdb::DataVerificationInfo& /*info*/,
      rocksdb::IODebugContext* dbg) override {
    return PositionedAppend(data, offset, options, dbg);
  }
  rocksdb::IOStatus Truncate(uint64_t size, const rocksdb::IOOptions& options,
                             rocksdb::IODebugContext* dbg) override {
    MutexLock lock(&fs_->mu_);
    rocksdb::IOStatus s = fs_->Admit("truncate " + path_);
    if (s.ok()) s = target()->Truncate(size, options, dbg);
    if (s.ok()) {
      state_->size = size;
      state_->synced = std::min(state_->synced, size);
    }
    return s;
  }
  rocksdb::IOStatus Flush(const rocksdb::IOOptions& options,
                          rocksdb::IODebugContext* dbg) override {
    {
      MutexLock lock(&fs_->mu_);
      if (fs_->operations_ >= fs_->cut_at_) {  // Not counted.
        return rocksdb::IOStatus::IOError("simulated power loss");
      }
    }
    return target()->Flush(options, dbg);
  }
  rocksdb::IOStatus Sync(const rocksdb::IOOptions& options,
                         rocksdb::IODebugContext* dbg) override {
    MutexLock lock(&fs_->mu_);
    rocksdb::IOStatus s = fs_->Admit("sync " + path_);
    if (s.ok()) s = target()->Sync(options, dbg);
    if (s.ok()) state_->synced = state_->size;
    return s;
  }
  rocksdb::IOStatus Fsync(const rocksdb::IOOptions& options,
                          rocksdb::IODebugContext* dbg) override {
    MutexLock lock(&fs_->mu_);
    rocksdb::IOStatus s = fs_->Admit("fsync " + path_);
    if (s.ok()) s = target()->Fsync(options, dbg);
    if (s.ok()) state_->synced = state_->size;
    return s;
  }
  rocksdb::IOStatus RangeSync(uint64_t offset, uint64_t nbytes,
                              const rocksdb::IOOptions& options,
                              rocksdb::IODebugContext* dbg) override {
    MutexLock lock(&fs_->mu_);
    rocksdb::IOStatus s = fs_->Admit("range sync " + path_);
    // NOTE: nothing becomes durable (power_loss_fs.h).
    return s.ok() ? target()->RangeSync(offset, nbytes, options, dbg) : s;
  }

 private:
  PowerLossFileSystem* const fs_;
  const std::string path_;
  const std::shared_ptr<State> state_;
};

// A directory: its Fsync makes the name changes in it durable.
class PowerLossDirectory : public rocksdb::FSDirectoryWrapper {
 public:
  PowerLossDirectory(PowerLossFileSystem* fs, std::string path,
                     std::unique_ptr<rocksdb::FSDirectory> dir)
      : FSDirectoryWrapper(std::move(dir)), fs_(fs), path_(std::move(path)) {}

  rocksdb::IOStatus Fsync(const rocksdb::IOOptions& options,
                          rocksdb::IODebugContext* dbg) override {
    return FsyncWithDirOptions(options, dbg, rocksdb::DirFsyncOptions());
  }
  rocksdb::IOStatus FsyncWithDirOptions(
      const rocksdb::IOOptions& options, rocksdb::IODebugContext* dbg,
      const rocksdb::DirFsyncOptions& dir_options) override {
    MutexLock lock(&fs_->mu_);
    rocksdb::IOStatus s = fs_->Admit("fsync directory " + path_);
    if (s.ok()) {
      s = FSDirectoryWrapper::FsyncWithDirOptions(options, dbg, dir_options);
    }
    if (s.ok()) fs_->DirectorySynced(path_);
    return s;
  }

 private:
  PowerLossFileSystem* const fs_;
  const std::string path_;
};

PowerLossFileSystem::PowerLossFileSystem(
    std::shared_ptr<rocksdb::FileSystem> target)
    : FileSystemWrapper(std::move(target)) {}

uint64_t PowerLossFileSystem::operations() const {
  MutexLock lock(&mu_);
  return operations_;
}

void PowerLossFileSystem::CutPowerAt(uint64_t n) {
  MutexLock lock(&mu_);
  cut_at_ = n;
}

void PowerLossFileSystem::CutPowerNow() {
  MutexLock lock(&mu_);
  cut_at_ = std::min(cut_at_, operations_);
}

bool PowerLossFileSystem::power_cut() const {
  MutexLock lock(&mu_);
  return operations_ >= cut_at_;
}

std::string PowerLossFileSystem::first_refused() const {
  MutexLock lock(&mu_);
  return first_refused_;
}

rocksdb::IOStatus PowerLossFileSystem::Admit(const std::string& what) {
  if (operations_++ < cut_at_) return rocksdb::IOStatus::OK();
  if (first_refused_.empty()) first_refused_ = what;
  return rocksdb::IOStatus::IOError("simulated power loss: " + what);
}

bool PowerLossFileSystem::Exists(const std::string& path) {
  std::error_code ec;
  return fs::exists(fs::symlink_status(path, ec));
}

void PowerLossFileSystem::DirectorySynced(const std::string& dir) {
  journal_.erase(
      std::remove_if(journal_.begin(), journal_.end(),
                     [&](const NameChange& c) { return c.dir == dir; }),
      journal_.end());
}

rocksdb::IOStatus PowerLossFileSystem::OpenForWrite(
    const std::string& raw_path, const rocksdb::FileOptions& options,
    bool reopen, std::unique_ptr<rocksdb::FSWritableFile>* result,
    rocksdb::IODebugContext* dbg) {
  const std::string path = Normal(raw_path);
  MutexLock lock(&mu_);
  rocksdb::IOStatus s = Admit((reopen ? "reopen " : "create ") + path);
  if (!s.ok()) return s;
  const bool existed = Exists(path);
  std::error_code ec;
  const uint64_t size_before = existed ? fs::file_size(path, ec) : 0;
  std::unique_ptr<rocksdb::FSWritableFile> file;
  s = reopen ? target()->ReopenWritableFile(raw_path, options, &file, dbg)
             : target()->NewWritableFile(raw_path, options, &file, dbg);
  if (!s.ok()) return s;
  std::shared_ptr<FileState>& state = files_[path];
  if (!reopen || state == nullptr) {
    // NOTE: a file created over an old one loses the old bytes at once.
    state = std::make_shared<FileState>();
    if (reopen) state->size = state->synced = ec ? 0 : size_before;
  }
  if (!existed) {
    journal_.push_back(
        {NameChange::Kind::kCreated, Parent(path), path, "", std::nullopt});
  }
  result->reset(new PowerLossWritableFile(this, path, state, std::move(file)));
  return s;
}

rocksdb::IOStatus PowerLossFileSystem::NewWritableFile(
    const std::string& path, const rocksdb::FileOptions& options,
    std::unique_ptr<rocksdb::FSWritableFile>* result,
    rocksdb::IODebugContext* dbg) {
  return OpenForWrite(path, options, /*reopen=*/false, result, dbg);
}

rocksdb::IOStatus PowerLossFileSystem::ReopenWritableFile(
    const std::string& path, const rocksdb::FileOptions& options,
    std::unique_ptr<rocksdb::FSWritableFile>* result,
    rocksdb::IODebugContext* dbg) {
  return OpenForWrite(path, options, /*reopen=*/true, result, dbg);
}

rocksdb::IOStatus PowerLossFileSystem::ReuseWritableFile(
    const std::string& path, const std::string& /*old_path*/,
    const rocksdb::FileOptions& /*options*/,
    std::unique_ptr<rocksdb::FSWritableFile>* /*result*/,
    rocksdb::IODebugContext* /*dbg*/) {
  return rocksdb::IOStatus::NotSupported("PowerLossFileSystem: reuse " + path);
}

rocksdb::IOStatus PowerLossFileSystem::NewRandomRWFile(
    const std::string& path, const rocksdb::FileOptions& /*options*/,
    std::unique_ptr<rocksdb::FSRandomRWFile>* /*result*/,
    rocksdb::IODebugContext* /*dbg*/) {
  return rocksdb::IOStatus::NotSupported("PowerLossFileSystem: random rw " +
                                         path);
}

rocksdb::IOStatus PowerLossFileSystem::NewDirectory(
    const std::string& path, const rocksdb::IOOptions& options,
    std::unique_ptr<rocksdb::FSDirectory>* result,
    rocksdb::IODebugContext* dbg) {
  std::unique_ptr<rocksdb::FSDirectory> dir;
  rocksdb::IOStatus s = target()->NewDirectory(path, options, &dir, dbg);
  if (s.ok())
    result->reset(new PowerLossDirectory(this, Normal(path), std::move(dir)));
  return s;
}

rocksdb::IOStatus PowerLossFileSystem::DeleteFile(
    const std::string& raw_path, const rocksdb::IOOptions& options,
    rocksdb::IODebugContext* dbg) {
  const std::string path = Normal(raw_path);
  MutexLock lock(&mu_);
  rocksdb::IOStatus s = Admit("delete " + path);
  if (s.ok()) s = target()->DeleteFile(raw_path, options, dbg);
  if (s.ok()) {
    // NOTE: durable at once; what named `path` is forgotten.
    files_.erase(path);
    journal_.erase(
        std::remove_if(journal_.begin(), journal_.end(),
                       [&](const NameChange& c) { return c.path == path; }),
        journal_.end());
  }
  return s;
}

rocksdb::IOStatus PowerLossFileSystem::Truncate(
    const std::string& raw_path, size_t size, const rocksdb::IOOptions& options,
    rocksdb::IODebugContext* dbg) {
  const std::string path = Normal(raw_path);
  MutexLock lock(&mu_);
  rocksdb::IOStatus s = Admit("truncate " + path);
  if (s.ok()) s = target()->Truncate(raw_path, size, options, dbg);
  auto it = files_.find(path);
  if (s.ok() && it != files_.end()) {
    it->second->size = size;
    it->second->synced = std::min<uint64_t>(it->second->synced, size);
  }
  return s;
}

rocksdb::IOStatus PowerLossFileSystem::CreateDirectory(
    const std::string& raw_path, bool if_missing,
    const rocksdb::IOOptions& options, rocksdb::IODebugContext* dbg) {
  const std::string path = Normal(raw_path);
  MutexLock lock(&mu_);
  rocksdb::IOStatus s = Admit("create directory " + path);
  if (!s.ok()) return s;
  const bool existed = Exists(path);
  s = if_missing ? target()->CreateDirIfMissing(raw_path, options, dbg)
                 : target()->CreateDir(raw_path, options, dbg);
  if (s.ok() && !existed) {
    journal_.push_back(
        {NameChange::Kind::kDirCreated, Parent(path), path, "", std::nullopt});
  }
  return s;
}

rocksdb::IOStatus PowerLossFileSystem::CreateDir(
    const std::string& path, const rocksdb::IOOptions& options,
    rocksdb::IODebugContext* dbg) {
  return CreateDirectory(path, /*if_missing=*/false, options, dbg);
}

rocksdb::IOStatus PowerLossFileSystem::CreateDirIfMissing(
    const std::string& path, const rocksdb::IOOptions& options,
    rocksdb::IODebugContext* dbg) {
  return CreateDirectory(path, /*if_missing=*/true, options, dbg);
}

rocksdb::IOStatus PowerLossFileSystem::DeleteDir(
    const std::string& path, const rocksdb::IOOptions& options,
    rocksdb::IODebugContext* dbg) {
  MutexLock lock(&mu_);
  rocksdb::IOStatus s = Admit("delete directory " + Normal(path));
  return s.ok() ? target()->DeleteDir(path, options, dbg) : s;
}

rocksdb::IOStatus PowerLossFileSystem::RenameFile(
    const std::string& raw_from, const std::string& raw_to,
    const rocksdb::IOOptions& options, rocksdb::IODebugContext* dbg) {
  const std::string from = Normal(raw_from), to = Normal(raw_to);
  MutexLock lock(&mu_);
  rocksdb::IOStatus s = Admit("rename " + from + " to " + to);
  if (!s.ok()) return s;
  // What a power loss would bring back under `to`: its durable bytes.
  std::optional<std::string> replaced;
  if (Exists(to)) {
    std::ifstream in(to, std::ios::binary);
    replaced.emplace(std::istreambuf_iterator<char>(in),
                     std::istreambuf_iterator<char>());
    auto it = files_.find(to);
    if (it != files_.end() && replaced->size() > it->second->synced) {
      replaced->resize(it->second->synced);
    }
  }
  s = target()->RenameFile(raw_from, raw_to, options, dbg);
  if (!s.ok()) return s;
  auto it = files_.find(from);
  if (it != files_.end()) {
    files_[to] = it->second;
    files_.erase(from);
  } else {
    files_.erase(to);
  }
  journal_.push_back(
      {NameChange::Kind::kRenamed, Parent(to), to, from, std::move(replaced)});
  return s;
}

rocksdb::IOStatus PowerLossFileSystem::LinkFile(
    const std::string& raw_from, const std::string& raw_to,
    const rocksdb::IOOptions& options, rocksdb::IODebugContext* dbg) {
  const std::string from = Normal(raw_from), to = Normal(raw_to);
  MutexLock lock(&mu_);
  rocksdb::IOStatus s = Admit("link " + from + " to " + to);
  if (s.ok()) s = target()->LinkFile(raw_from, raw_to, options, dbg);
  if (!s.ok()) return s;
  auto it = files_.find(from);
  if (it != files_.end()) files_[to] = it->second;  // One inode, two names.
  journal_.push_back(
      {NameChange::Kind::kCreated, Parent(to), to, "", std::nullopt});
  return s;
}

Status PowerLossFileSystem::DropUnsyncedData() {
  MutexLock lock(&mu_);
  std::error_code ec;
  // Every tracked file back to its durable bytes...
  for (const auto& [path, state] : files_) {
    if (!Exists(path)) continue;  // Removed behind our back.
    const uint64_t size = fs::file_size(path, ec);
    if (!ec && size > state->synced) fs::resize_file(path, state->synced, ec);
    if (ec) {
      return InternalError("power loss: cutting " + path + ": " + ec.message());
    }
  }
  // ...then every name change not made durable undone, newest first.
  for (auto c = journal_.rbegin(); c != journal_.rend(); ++c) {
    switch (c->kind) {
      case NameChange::Kind::kCreated:
        fs::remove(c->path, ec);
        files_.erase(c->path);
        break;
      case NameChange::Kind::kDirCreated:
        fs::remove_all(c->path, ec);
        for (auto f = files_.begin(); f != files_.end();) {
          f = Under(f->first, c->path) ? files_.erase(f) : std::next(f);
        }
        break;
      case NameChange::Kind::kRenamed:
        if (Exists(c->path)) fs::rename(c->path, c->from, ec);
        if (c->replaced) {
          std::ofstream out(c->path, std::ios::binary | std::ios::trunc);
          out << *c->replaced;
          if (!out) ec = std::make_error_code(std::errc::io_error);
        }
        break;
    }
    if (ec) {
      return InternalError("power loss: undoing the new name " + c->path +
                           ": " + ec.message());
    }
  }
  journal_.clear();
  files_.clear();
  operations_ = 0;
  cut_at_ = std::numeric_limits<uint64_t>::max();
  first_refused_.clear();
  return OkStatus();
}

}  // namespace switchyard::testing
