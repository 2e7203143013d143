// Direct writes of checkpoint chunk files: see direct_write_fs.h.
#include "storage/direct_write_fs.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <future>

#include "common/buffer_pool.h"
#include "common/tensor.h"
#include "storage/background_io.h"

namespace switchyard::storage {
namespace {

constexpr size_t kAlign = 4096;  // O_DIRECT offsets, lengths and buffers.
constexpr size_t kBufferBytes = size_t{16} << 20;

rocksdb::IOStatus Errno(const std::string& what, int err) {
  const std::string text = what + ": " + std::strerror(err);
  return err == ENOSPC ? rocksdb::IOStatus::NoSpace(text)
                       : rocksdb::IOStatus::IOError(text);
}

// Appends gather in a 16 MiB huge-page buffer from a BufferPool; a
// full buffer goes to disk with one O_DIRECT write in the background while
// appends fill the other buffer. Sync and Close wait for it, write the
// unaligned tail padded to 4 KiB and truncate the file to its size.
class DirectWritableFile : public rocksdb::FSWritableFile {
 public:
  DirectWritableFile(std::string path, int fd, Tensor buffer, Tensor spare)
      : path_(std::move(path)),
        fd_(fd),
        buffer_(std::move(buffer)),
        spare_(std::move(spare)) {}
  ~DirectWritableFile() override {
    if (pending_.valid()) pending_.wait();
    if (fd_ >= 0) ::close(fd_);
  }

  rocksdb::IOStatus Append(const rocksdb::Slice& data,
                           const rocksdb::IOOptions& /*options*/,
                           rocksdb::IODebugContext* /*dbg*/) override {
    const char* p = data.data();
    size_t n = data.size();
    while (n > 0) {
      const size_t k = std::min(n, kBufferBytes - filled_);
      std::memcpy(Bytes(buffer_) + filled_, p, k);
      filled_ += k;
      size_ += k;
      p += k;
      n -= k;
      if (filled_ == kBufferBytes) {
        rocksdb::IOStatus s = WaitForPending();
        if (!s.ok()) return s;
        std::swap(buffer_, spare_);
        pending_ = InBackground([this, full = Bytes(spare_), at = written_] {
          return WriteAt(full, at, kBufferBytes);
        });
        written_ += kBufferBytes;
        filled_ = 0;
      }
    }
    return rocksdb::IOStatus::OK();
  }
  rocksdb::IOStatus Flush(const rocksdb::IOOptions& /*options*/,
                          rocksdb::IODebugContext* /*dbg*/) override {
    return rocksdb::IOStatus::OK();  // Written when full, synced or closed.
  }
  rocksdb::IOStatus Sync(const rocksdb::IOOptions& /*options*/,
                         rocksdb::IODebugContext* /*dbg*/) override {
    rocksdb::IOStatus s = WriteTail();
    if (s.ok() && ::fdatasync(fd_) != 0) s = Errno("fdatasync " + path_, errno);
    return s;
  }
  rocksdb::IOStatus Fsync(const rocksdb::IOOptions& /*options*/,
                          rocksdb::IODebugContext* /*dbg*/) override {
    rocksdb::IOStatus s = WriteTail();
    if (s.ok() && ::fsync(fd_) != 0) s = Errno("fsync " + path_, errno);
    return s;
  }
  rocksdb::IOStatus Close(const rocksdb::IOOptions& /*options*/,
                          rocksdb::IODebugContext* /*dbg*/) override {
    if (fd_ < 0) return rocksdb::IOStatus::OK();
    rocksdb::IOStatus s = WriteTail();
    if (::close(fd_) != 0 && s.ok()) s = Errno("close " + path_, errno);
    fd_ = -1;
    return s;
  }
  rocksdb::IOStatus Truncate(uint64_t size,
                             const rocksdb::IOOptions& /*options*/,
                             rocksdb::IODebugContext* /*dbg*/) override {
    return size == size_ ? rocksdb::IOStatus::OK()
                         : rocksdb::IOStatus::NotSupported(
                               "truncating a direct-write file");
  }
  uint64_t GetFileSize(const rocksdb::IOOptions& /*options*/,
                       rocksdb::IODebugContext* /*dbg*/) override {
    return size_;
  }

 private:
  rocksdb::IOStatus WaitForPending() {
    return pending_.valid() ? pending_.get() : rocksdb::IOStatus::OK();
  }

  rocksdb::IOStatus WriteAt(const char* data, uint64_t offset, size_t bytes) {
    for (size_t done = 0; done < bytes;) {
      const ssize_t w = ::pwrite(fd_, data + done, bytes - done,
                                 static_cast<off_t>(offset + done));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) return Errno("write " + path_, errno);
      if (w == 0) return Errno("write " + path_, ENOSPC);
      done += static_cast<size_t>(w);
    }
    return rocksdb::IOStatus::OK();
  }

  // The buffered tail, padded with zeros to an aligned length, at its
  // place; the file is then cut to its size. The tail stays buffered, so
  // later appends rewrite that block.
  rocksdb::IOStatus WriteTail() {
    rocksdb::IOStatus s = WaitForPending();
    if (!s.ok() || filled_ == 0) return s;
    const size_t padded = (filled_ + kAlign - 1) / kAlign * kAlign;
    std::memset(Bytes(buffer_) + filled_, 0, padded - filled_);
    s = WriteAt(Bytes(buffer_), written_, padded);
    if (s.ok() && ::ftruncate(fd_, static_cast<off_t>(size_)) != 0) {
      s = Errno("truncate " + path_, errno);
    }
    return s;
  }

  const std::string path_;
  int fd_;
  static char* Bytes(Tensor& t) { return static_cast<char*>(t.data()); }

  Tensor buffer_;  // Being filled.
  Tensor spare_;   // Being written by pending_, or free.
  std::future<rocksdb::IOStatus> pending_;
  size_t filled_ = 0;     // Bytes in buffer_ (from file offset written_).
  uint64_t written_ = 0;  // Bytes written whole (a multiple of 16 MiB).
  uint64_t size_ = 0;     // Bytes appended.
};

class DirectChunkFileSystem : public rocksdb::FileSystemWrapper {
 public:
  DirectChunkFileSystem(const std::shared_ptr<rocksdb::FileSystem>& target,
                        std::string suffix)
      : FileSystemWrapper(target), suffix_(std::move(suffix)) {}
  const char* Name() const override { return "SwitchyardDirectWrite"; }

  rocksdb::IOStatus NewWritableFile(
      const std::string& path, const rocksdb::FileOptions& options,
      std::unique_ptr<rocksdb::FSWritableFile>* result,
      rocksdb::IODebugContext* dbg) override {
    if (path.size() >= suffix_.size() &&
        path.compare(path.size() - suffix_.size(), suffix_.size(), suffix_) ==
            0) {
      const int fd =
          ::open(path.c_str(),
                 O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC, 0644);
      if (fd >= 0) {
        const std::vector<int64_t> shape = {kBufferBytes / sizeof(float)};
        auto buffer = buffers_->Take(DType::kF32, shape);
        auto spare = buffers_->Take(DType::kF32, shape);
        if (!buffer.ok() || !spare.ok()) {
          ::close(fd);
          return rocksdb::IOStatus::NoSpace("no memory for write buffers");
        }
        result->reset(new DirectWritableFile(
            path, fd, std::move(buffer).value(), std::move(spare).value()));
        return rocksdb::IOStatus::OK();
      }
      if (errno != EINVAL) return Errno("open " + path, errno);
      // EINVAL: no O_DIRECT on this file system (tmpfs and the like).
    }
    return target()->NewWritableFile(path, options, result, dbg);
  }

 private:
  const std::string suffix_;
  // Write buffers (huge pages: AllocateTensorMemory); up to four idle ones
  // are kept between files.
  const std::shared_ptr<BufferPool> buffers_ =
      BufferPool::Create(4 * kBufferBytes);
};

}  // namespace

const std::shared_ptr<rocksdb::FileSystem>& DirectWriteFileSystem() {
  static const auto* const fs = new std::shared_ptr<rocksdb::FileSystem>(
      std::make_shared<DirectChunkFileSystem>(rocksdb::FileSystem::Default(),
                                              kDirectWriteSuffix));
  return *fs;
}

rocksdb::Env* DirectWriteEnv() {
  static rocksdb::Env* const env =
      rocksdb::NewCompositeEnv(DirectWriteFileSystem()).release();
  return env;
}

}  // namespace switchyard::storage
