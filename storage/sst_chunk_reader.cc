// Direct chunk reads from SST files: see sst_chunk_reader.h; the entry
// layout is RocksDB's block-based table format (docs/checkpoint_format.md,
// "Reading").
#include "storage/sst_chunk_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <future>

#include "common/digest.h"
#include "storage/background_io.h"

namespace switchyard::storage {
namespace {

constexpr size_t kAlign = 4096;    // O_DIRECT offsets, lengths and buffers.
constexpr uint8_t kTypeValue = 1;  // RocksDB's ValueType of a Put.

void PutVarint(std::string* out, uint64_t v) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

// Decodes a varint of at most `max_bytes` from [*p, end); false if it does
// not fit.
bool GetVarint(const char** p, const char* end, int max_bytes, uint64_t* v) {
  uint64_t result = 0;
  for (int shift = 0, i = 0; i < max_bytes && *p < end; ++i, shift += 7) {
    const uint8_t byte = static_cast<uint8_t>(*(*p)++);
    result |= uint64_t{byte & 0x7fu} << shift;
    if ((byte & 0x80) == 0) {
      *v = result;
      return true;
    }
  }
  return false;
}

class ChunkBlocksCollector : public rocksdb::TablePropertiesCollector {
 public:
  explicit ChunkBlocksCollector(const std::string& prefix) : prefix_(prefix) {}

  rocksdb::Status AddUserKey(const rocksdb::Slice& key,
                             const rocksdb::Slice& /*value*/,
                             rocksdb::EntryType type,
                             rocksdb::SequenceNumber /*seq*/,
                             uint64_t file_size) override {
    // `file_size` is the table's size when the key is added, after any
    // block it closed was written: the offset of the key's data block.
    if (type == rocksdb::kEntryPut && key.starts_with(prefix_)) {
      PutVarint(&blocks_, key.size());
      blocks_.append(key.data(), key.size());
      PutVarint(&blocks_, file_size);
    }
    return rocksdb::Status::OK();
  }
  rocksdb::Status Finish(rocksdb::UserCollectedProperties* props) override {
    // Also when empty: the property's presence says which keys the
    // table does not hold.
    (*props)[kChunkBlocksProperty] = blocks_;
    return rocksdb::Status::OK();
  }
  rocksdb::UserCollectedProperties GetReadableProperties() const override {
    return {};
  }
  const char* Name() const override { return "ChunkBlocksCollector"; }

 private:
  const std::string prefix_;
  std::string blocks_;
};

class ChunkBlocksCollectorFactory
    : public rocksdb::TablePropertiesCollectorFactory {
 public:
  explicit ChunkBlocksCollectorFactory(std::string prefix)
      : prefix_(std::move(prefix)) {}
  rocksdb::TablePropertiesCollector* CreateTablePropertiesCollector(
      rocksdb::TablePropertiesCollectorFactory::Context) override {
    return new ChunkBlocksCollector(prefix_);
  }
  const char* Name() const override { return "ChunkBlocksCollectorFactory"; }

 private:
  const std::string prefix_;
};

// Sequential reads of one file in aligned windows, O_DIRECT where the file
// system allows it. While the caller copies out of one window, the reads
// of the next kReadAhead windows are in flight (each on a background I/O
// thread): the copy and checksum of a window take about a third of its
// read here, and one read at a time left the disk idle between reads.
class WindowedFile {
 public:
  // `buffers`: kReadAhead + 1 windows of kWindowBytes, aligned for O_DIRECT.
  explicit WindowedFile(std::vector<char*> buffers)
      : idle_(std::move(buffers)) {}
  ~WindowedFile() {
    for (Window& w : ahead_) w.read.wait();
    if (fd_ >= 0) ::close(fd_);
  }

  Status Open(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd_ < 0 && errno == EINVAL) {  // tmpfs and the like.
      fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd_ >= 0) ::posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
    }
    if (fd_ < 0) {
      return UnavailableError("open " + path + ": " + std::strerror(errno));
    }
    struct stat st;
    if (::fstat(fd_, &st) != 0) {
      return UnavailableError("stat " + path + ": " + std::strerror(errno));
    }
    file_bytes_ = static_cast<uint64_t>(st.st_size);
    return OkStatus();
  }

  // Copies [pos, pos + n) of the file to `dst`, calling `on_piece` (when
  // given) on each piece of at most kPieceBytes just copied.
  Status Copy(
      uint64_t pos, size_t n, char* dst,
      const std::function<void(const char*, size_t)>& on_piece = nullptr) {
    while (n > 0) {
      if (pos < cur_.start || pos >= cur_.start + cur_.size) {
        RETURN_IF_ERROR(Fill(pos));
      }
      const size_t k =
          std::min<uint64_t>({n, cur_.start + cur_.size - pos, kPieceBytes});
      std::memcpy(dst, cur_.data + (pos - cur_.start), k);
      if (on_piece) on_piece(dst, k);
      pos += k;
      dst += k;
      n -= k;
    }
    return OkStatus();
  }

 private:
  struct Window {
    char* data = nullptr;
    uint64_t start = 0;
    size_t size = 0;
    std::future<Status> read;  // While it is being read.
  };

  // Reads the window at w->start (aligned), short only at the file's end.
  Status Read(Window* w) const {
    w->size = 0;
    while (w->size < kWindowBytes) {
      const ssize_t r = ::pread(fd_, w->data + w->size, kWindowBytes - w->size,
                                static_cast<off_t>(w->start + w->size));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return DataLossError(std::string("read: ") + strerror(errno));
      if (r == 0) break;
      w->size += static_cast<size_t>(r);
      if (w->size % kAlign != 0) break;  // The end of the file.
    }
    return OkStatus();
  }

  // Makes the window at `pos` current; then starts reads of the windows
  // after it, as far as buffers allow.
  Status Fill(uint64_t pos) {
    const uint64_t start = pos & ~uint64_t{kAlign - 1};
    if (cur_.data != nullptr) idle_.push_back(cur_.data);
    cur_ = Window();
    // Windows read ahead of `start` are done with; the one at `start` is
    // the next (reads are sequential but for the odd step back into the
    // window before).
    Status read;
    while (!ahead_.empty() && cur_.data == nullptr) {
      // (The read writes into the deque's element: done before it moves.)
      Status s = ahead_.front().read.get();
      Window w = std::move(ahead_.front());
      ahead_.pop_front();
      if (w.start == start) {
        read = std::move(s);
        cur_ = std::move(w);
      } else {
        idle_.push_back(w.data);
      }
    }
    if (cur_.data == nullptr) {  // Not read ahead: read it now.
      for (Window& w : ahead_) {
        w.read.wait();
        idle_.push_back(w.data);
      }
      ahead_.clear();
      cur_.data = idle_.back();
      idle_.pop_back();
      cur_.start = start;
      read = Read(&cur_);
    }
    RETURN_IF_ERROR(read);
    if (pos >= cur_.start + cur_.size) {
      return DataLossError("offset " + std::to_string(pos) +
                           " is past the end of the file");
    }
    uint64_t next = ahead_.empty() ? cur_.start + kWindowBytes
                                   : ahead_.back().start + kWindowBytes;
    for (; !idle_.empty() && next < file_bytes_; next += kWindowBytes) {
      Window& w = ahead_.emplace_back();
      w.data = idle_.back();
      idle_.pop_back();
      w.start = next;
      w.read = InBackground([this, &w] { return Read(&w); });
    }
    return OkStatus();
  }

  int fd_ = -1;
  uint64_t file_bytes_ = 0;
  Window cur_;
  std::deque<Window> ahead_;  // Being read, in file order.
  std::vector<char*> idle_;   // Buffers of no window.
};

std::atomic<uint64_t> direct_reads{0};
std::atomic<uint64_t> rocksdb_reads{0};

}  // namespace

std::shared_ptr<rocksdb::TablePropertiesCollectorFactory>
NewChunkBlocksCollectorFactory(std::string key_prefix) {
  return std::make_shared<ChunkBlocksCollectorFactory>(std::move(key_prefix));
}

StatusOr<std::map<std::string, uint64_t>> ParseChunkBlocks(
    const std::string& property) {
  std::map<std::string, uint64_t> blocks;
  const char* p = property.data();
  const char* end = p + property.size();
  while (p < end) {
    uint64_t key_size = 0, offset = 0;
    if (!GetVarint(&p, end, 5, &key_size) ||
        key_size > static_cast<uint64_t>(end - p)) {
      return InvalidArgumentError("bad chunk block property");
    }
    std::string key(p, key_size);
    p += key_size;
    if (!GetVarint(&p, end, 10, &offset)) {
      return InvalidArgumentError("bad chunk block property");
    }
    blocks[std::move(key)] = offset;
  }
  return blocks;
}

Status ReadChunksDirect(const std::string& path,
                        const std::map<std::string, uint64_t>& blocks,
                        const std::vector<ChunkTarget>& chunks,
                        BufferPool& windows, const PieceCallback& on_piece) {
  const std::vector<int64_t> shape = {kWindowBytes / sizeof(float)};
  std::vector<Tensor> buffers;
  std::vector<char*> data;
  for (size_t i = 0; i <= kReadAhead; ++i) {
    ASSIGN_OR_RETURN(Tensor buffer, windows.Take(DType::kF32, shape));
    data.push_back(static_cast<char*>(buffer.data()));
    buffers.push_back(std::move(buffer));
  }
  // Declared after the buffers: it waits for its reads before they go
  // back.
  WindowedFile file(std::move(data));
  RETURN_IF_ERROR(file.Open(path));

  Xxh3Stream hash;
  uint64_t pos = 0;
  uint64_t block = ~uint64_t{0};
  std::string last_key;  // Internal key (user key + 8 bytes) of the entry.
  for (size_t index = 0; index < chunks.size(); ++index) {
    const ChunkTarget& chunk = chunks[index];
    auto it = blocks.find(chunk.key);
    if (it == blocks.end()) return NotFoundError(chunk.key + " is not listed");
    const bool first_in_block = it->second != block;
    if (first_in_block) {
      if (block != ~uint64_t{0} && it->second < pos) {
        return DataLossError(chunk.key + ": blocks out of order");
      }
      block = pos = it->second;
      last_key.clear();
    }
    // Entry: varint32 shared key bytes, varint32 unshared key bytes,
    // varint32 value bytes, the unshared key bytes, the value.
    char header[15];
    RETURN_IF_ERROR(file.Copy(pos, sizeof(header), header));
    const char* p = header;
    const char* end = header + sizeof(header);
    uint64_t shared = 0, unshared = 0, value_bytes = 0;
    if (!GetVarint(&p, end, 5, &shared) || !GetVarint(&p, end, 5, &unshared) ||
        !GetVarint(&p, end, 5, &value_bytes) || shared > last_key.size() ||
        (first_in_block && shared != 0) || unshared > 4096) {
      return DataLossError(chunk.key + ": unexpected entry header");
    }
    pos += static_cast<uint64_t>(p - header);
    std::string key = last_key.substr(0, shared);
    key.resize(shared + unshared);
    RETURN_IF_ERROR(file.Copy(pos, unshared, key.data() + shared));
    pos += unshared;
    if (key.size() != chunk.key.size() + 8 ||
        key.compare(0, chunk.key.size(), chunk.key) != 0 ||
        static_cast<uint8_t>(key[chunk.key.size()]) != kTypeValue) {
      return DataLossError(chunk.key + ": another key at its place");
    }
    if (value_bytes != chunk.bytes) {
      return DataLossError(chunk.key + ": " + std::to_string(value_bytes) +
                           " bytes, the manifest says " +
                           std::to_string(chunk.bytes));
    }
    hash.Reset();
    RETURN_IF_ERROR(
        file.Copy(pos, chunk.bytes, chunk.dst, [&](const char* p, size_t n) {
          hash.Update(p, n);
          if (on_piece) on_piece(index, p, n);
        }));
    if (hash.value() != chunk.xxh3) {
      return DataLossError(chunk.key + " does not match its checksum");
    }
    pos += chunk.bytes;
    last_key = std::move(key);
  }
  return OkStatus();
}

ShardReadCounts GetShardReadCounts() {
  return {direct_reads.load(), rocksdb_reads.load()};
}

void CountShardRead(bool direct) { ++(direct ? direct_reads : rocksdb_reads); }

}  // namespace switchyard::storage
