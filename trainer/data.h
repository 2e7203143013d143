// Byte-level training data (vocabulary 256) from text files.
//
// A corpus is a file, or every regular file under a directory in sorted path
// order, joined with '\n'. The last validation_fraction of its bytes is held
// out for validation. Training batches are a pure function of (seed, step,
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

  size_t train_bytes() const { return split_; }
  size_t validation_bytes() const { return text_.size() - split_; }
  int num_files() const { return num_files_; }

  // Windows of seq_len + 1 bytes from the training split.
  Batch TrainBatch(uint64_t seed, int64_t step, int rank, int batch_size,
                   int seq_len) const;
  // The index-th batch of consecutive validation windows (wrapping around).
  Batch ValidationBatch(int64_t index, int batch_size, int seq_len) const;

 private:
  Batch Window(size_t base, size_t span, const std::vector<size_t>& starts,
               int seq_len) const;

  std::string text_;
  size_t split_ = 0;
  int num_files_ = 0;
};

// Rows [m * B / M, (m + 1) * B / M) of `batch`: micro-batch m of M.
Batch MicroBatch(const Batch& batch, int m, int num_micro_batches);

}  // namespace switchyard::trainer

#endif  // SWITCHYARD_TRAINER_DATA_H_
