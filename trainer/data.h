// Byte-level training data (vocabulary 256) from text files.
//
// A corpus is a file, or every regular file under a directory in sorted path
// order, joined with '\n'. The last validation_fraction of every file's bytes
// is held out for validation, so that every source (a language, say) is in
// both splits. Training batches are a pure function of (seed, step,
// rank): row i starts at RandomBits(seed, step, rank, i) modulo the number
// of start positions, so any step's batch can be recomputed after a restart
// without saved loader state. Immutable after Load; thread-safe.
#ifndef SWITCHYARD_TRAINER_DATA_H_
#define SWITCHYARD_TRAINER_DATA_H_

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace switchyard::trainer {

// Token windows: inputs and next-token targets, (batch_size, seq_len) each.
struct Batch {
  int batch_size = 0;
  int seq_len = 0;
  std::vector<int32_t> inputs;
  std::vector<int32_t> targets;
};

class ByteCorpus {
 public:
  // Fails with the path and sizes when the corpus cannot give both splits at
  // least one window of min_window bytes.
  static StatusOr<ByteCorpus> Load(const std::string& path,
                                   double validation_fraction, int min_window);
  // From bytes in memory (tests, tools).
  static StatusOr<ByteCorpus> FromText(std::string text,
                                       double validation_fraction,
                                       int min_window);

  // A file's share of the validation split (bytes [begin, begin + size)).
  struct Source {
    std::string name;  // Path relative to the corpus directory.
    size_t begin = 0;
    size_t size = 0;
  };

  size_t train_bytes() const { return split_; }
  size_t validation_bytes() const { return text_.size() - split_; }
  int num_files() const { return static_cast<int>(sources_.size()); }
  const std::vector<Source>& sources() const { return sources_; }

  // Windows of seq_len + 1 bytes from the training split.
  Batch TrainBatch(uint64_t seed, int64_t step, int rank, int batch_size,
                   int seq_len) const;
  // The index-th batch of validation windows: fixed pseudo-random starts
  // over the whole split (the same for every run and seed).
  Batch ValidationBatch(int64_t index, int batch_size, int seq_len) const;
  // Consecutive validation windows of one source (wrapping around within
  // it); batch_size 0 when the source is shorter than seq_len + 1 bytes.
  Batch SourceBatch(int source, int batch_size, int seq_len) const;

 private:
  // text = training split, then validation split (from byte `split`).
  static StatusOr<ByteCorpus> Make(std::string text, size_t split,
                                   int min_window);
  Batch Window(size_t base, size_t span, const std::vector<size_t>& starts,
               int seq_len) const;
  Batch Consecutive(size_t base, size_t span, int64_t index, int batch_size,
                    int seq_len) const;

  std::string text_;
  size_t split_ = 0;
  std::vector<Source> sources_;
};

// Rows [m * B / M, (m + 1) * B / M) of `batch`: micro-batch m of M.
Batch MicroBatch(const Batch& batch, int m, int num_micro_batches);

}  // namespace switchyard::trainer

#endif  // SWITCHYARD_TRAINER_DATA_H_
