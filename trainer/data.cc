#include "trainer/data.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <new>
#include <sstream>

#include "common/random.h"

namespace switchyard::trainer {

namespace fs = std::filesystem;

StatusOr<ByteCorpus> ByteCorpus::FromText(std::string text,
                                          double validation_fraction,
                                          int min_window) {
  if (validation_fraction <= 0 || validation_fraction >= 1) {
    return InvalidArgumentError("validation fraction " +
                                std::to_string(validation_fraction) +
                                " must be in (0, 1)");
  }
  const size_t split =
      static_cast<size_t>(text.size() * (1 - validation_fraction));
  const size_t size = text.size();
  ASSIGN_OR_RETURN(ByteCorpus corpus, Make(std::move(text), split, min_window));
  corpus.sources_.push_back({"", 0, size - split});
  return corpus;
}

StatusOr<ByteCorpus> ByteCorpus::Make(std::string text, size_t split,
                                      int min_window) {
  ByteCorpus corpus;
  corpus.split_ = split;
  corpus.text_ = std::move(text);
  const size_t window = static_cast<size_t>(min_window) + 1;
  if (corpus.train_bytes() < window || corpus.validation_bytes() < window) {
    return InvalidArgumentError(
        "corpus of " + std::to_string(corpus.text_.size()) +
        " bytes is too small: training (" +
        std::to_string(corpus.train_bytes()) + " bytes) and validation (" +
        std::to_string(corpus.validation_bytes()) +
        " bytes) each need at least " + std::to_string(window) +
        " bytes (seq_len + 1)");
  }
  return corpus;
}

StatusOr<ByteCorpus> ByteCorpus::Load(const std::string& path,
                                      double validation_fraction,
                                      int min_window) {
  std::error_code ec;
  std::vector<fs::path> files;
  if (fs::is_directory(path, ec)) {
    for (auto it = fs::recursive_directory_iterator(path, ec);
         it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (ec) break;
      if (it->is_regular_file(ec)) files.push_back(it->path());
    }
    std::sort(files.begin(), files.end());
  } else if (fs::is_regular_file(path, ec)) {
    files.push_back(path);
  } else {
    return NotFoundError("training data '" + path +
                         "' is not a file or a directory");
  }
  if (files.empty()) {
    return InvalidArgumentError("training data directory '" + path +
                                "' holds no files");
  }
  if (validation_fraction <= 0 || validation_fraction >= 1) {
    return InvalidArgumentError("validation fraction " +
                                std::to_string(validation_fraction) +
                                " must be in (0, 1)");
  }
  // Each file splits on its own: its head trains, its tail validates.
  std::string train, validation;
  std::vector<Source> sources;
  for (const fs::path& file : files) {
    std::ifstream in(file, std::ios::binary);
    if (!in) return UnavailableError("cannot read '" + file.string() + "'");
    std::string content;
    try {  // The text is held in memory whole; its size is the file's.
      std::stringstream buf;
      buf << in.rdbuf();
      content = buf.str();
    } catch (const std::bad_alloc&) {
      return ResourceExhaustedError("training data '" + file.string() +
                                    "' does not fit in memory");
    }
    const size_t cut =
        static_cast<size_t>(content.size() * (1 - validation_fraction));
    if (!train.empty()) train += '\n';
    train.append(content, 0, cut);
    if (!validation.empty()) validation += '\n';
    const std::string name = files.size() == 1 && !fs::is_directory(path, ec)
                                 ? file.filename().string()
                                 : fs::relative(file, path, ec).string();
    sources.push_back({name, validation.size(), content.size() - cut});
    validation.append(content, cut, std::string::npos);
  }
  const size_t split = train.size();
  auto corpus = Make(train + validation, split, min_window);
  if (!corpus.ok())
    return corpus.status().WithContext("training data '" + path + "'");
  corpus->sources_ = std::move(sources);
  return corpus;
}

Batch ByteCorpus::Window(size_t base, size_t span,
                         const std::vector<size_t>& starts, int seq_len) const {
  Batch b;
  b.batch_size = static_cast<int>(starts.size());
  b.seq_len = seq_len;
  b.inputs.resize(starts.size() * seq_len);
  b.targets.resize(starts.size() * seq_len);
  for (size_t r = 0; r < starts.size(); ++r) {
    for (int i = 0; i < seq_len; ++i) {
      const size_t at = base + (starts[r] + i) % span;
      const size_t next = base + (starts[r] + i + 1) % span;
      b.inputs[r * seq_len + i] = static_cast<unsigned char>(text_[at]);
      b.targets[r * seq_len + i] = static_cast<unsigned char>(text_[next]);
    }
  }
  return b;
}

Batch ByteCorpus::TrainBatch(uint64_t seed, int64_t step, int rank,
                             int batch_size, int seq_len) const {
  constexpr uint64_t kTagData = 21;
  const size_t positions =
      train_bytes() - seq_len;  // Starts keep the window inside.
  std::vector<size_t> starts(batch_size);
  for (int i = 0; i < batch_size; ++i) {
    starts[i] = RandomBits(seed, {kTagData, static_cast<uint64_t>(step),
                                  static_cast<uint64_t>(rank),
                                  static_cast<uint64_t>(i)}) %
                positions;
  }
  return Window(0, train_bytes(), starts, seq_len);
}

Batch ByteCorpus::Consecutive(size_t base, size_t span, int64_t index,
                              int batch_size, int seq_len) const {
  const size_t windows = std::max<size_t>(1, (span - 1) / seq_len);
  std::vector<size_t> starts(batch_size);
  for (int i = 0; i < batch_size; ++i) {
    starts[i] = ((index * batch_size + i) % windows) * seq_len;
  }
  return Window(base, span, starts, seq_len);
}

Batch ByteCorpus::ValidationBatch(int64_t index, int batch_size,
                                  int seq_len) const {
  // Windows at fixed pseudo-random starts, so that a few batches sample
  // every source of the split, not only the first.
  constexpr uint64_t kTagValidation = 22;
  const size_t positions = validation_bytes() - seq_len;
  std::vector<size_t> starts(batch_size);
  for (int i = 0; i < batch_size; ++i) {
    starts[i] = RandomBits(0, {kTagValidation, static_cast<uint64_t>(index),
                               static_cast<uint64_t>(i)}) %
                positions;
  }
  return Window(split_, validation_bytes(), starts, seq_len);
}

Batch ByteCorpus::SourceBatch(int source, int batch_size, int seq_len) const {
  const Source& s = sources_.at(source);
  if (s.size < static_cast<size_t>(seq_len) + 1) {
    Batch empty;
    empty.seq_len = seq_len;
    return empty;
  }
  return Consecutive(split_ + s.begin, s.size, 0, batch_size, seq_len);
}

Batch MicroBatch(const Batch& batch, int m, int num_micro_batches) {
  const int begin = m * batch.batch_size / num_micro_batches;
  const int end = (m + 1) * batch.batch_size / num_micro_batches;
  Batch out;
  out.batch_size = end - begin;
  out.seq_len = batch.seq_len;
  const size_t from = static_cast<size_t>(begin) * batch.seq_len;
  const size_t to = static_cast<size_t>(end) * batch.seq_len;
  out.inputs.assign(batch.inputs.begin() + from, batch.inputs.begin() + to);
  out.targets.assign(batch.targets.begin() + from, batch.targets.begin() + to);
  return out;
}

}  // namespace switchyard::trainer
