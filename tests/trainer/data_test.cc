// Byte-level data: loading, splits, recomputable batches, micro-batches.
#include "trainer/data.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

namespace switchyard::trainer {
namespace {

namespace fs = std::filesystem;

std::string Text(size_t n) {
  std::string s;
  for (size_t i = 0; i < n; ++i) s += static_cast<char>('a' + (i * 7) % 26);
  return s;
}

TEST(DataTest, BatchesAreAFunctionOfSeedStepAndRank) {
  auto corpus = ByteCorpus::FromText(Text(10000), 0.1, 32);
  ASSERT_TRUE(corpus.ok()) << corpus.status().ToString();
  EXPECT_EQ(corpus->train_bytes(), 9000u);
  EXPECT_EQ(corpus->validation_bytes(), 1000u);
  const Batch a = corpus->TrainBatch(7, 12, 1, 4, 32);
  const Batch again = corpus->TrainBatch(7, 12, 1, 4, 32);
  EXPECT_EQ(a.inputs, again.inputs);  // Recomputable: no loader state.
  EXPECT_NE(a.inputs, corpus->TrainBatch(7, 13, 1, 4, 32).inputs);
  EXPECT_NE(a.inputs, corpus->TrainBatch(7, 12, 0, 4, 32).inputs);
  EXPECT_NE(a.inputs, corpus->TrainBatch(8, 12, 1, 4, 32).inputs);
  ASSERT_EQ(a.inputs.size(), 4u * 32);
  // Targets are the inputs shifted by one byte.
  for (int r = 0; r < 4; ++r) {
    for (int i = 0; i + 1 < 32; ++i) {
      EXPECT_EQ(a.targets[r * 32 + i], a.inputs[r * 32 + i + 1]);
    }
  }
  for (int32_t token : a.inputs) {
    EXPECT_GE(token, 0);
    EXPECT_LT(token, 256);
  }
}

TEST(DataTest, ValidationComesFromTheHeldOutTail) {
  std::string text(900, 't');
  text += std::string(100, 'v');
  auto corpus = ByteCorpus::FromText(text, 0.1, 16);
  ASSERT_TRUE(corpus.ok());
  const Batch v = corpus->ValidationBatch(3, 2, 16);
  for (int32_t token : v.inputs) EXPECT_EQ(token, 'v');
  for (int step = 0; step < 20; ++step) {
    for (int32_t token : corpus->TrainBatch(1, step, 0, 4, 16).inputs) {
      ASSERT_EQ(token, 't');  // Training never reads validation bytes.
    }
  }
}

TEST(DataTest, MicroBatchesPartitionTheRows) {
  auto corpus = ByteCorpus::FromText(Text(5000), 0.1, 8);
  ASSERT_TRUE(corpus.ok());
  const Batch b = corpus->TrainBatch(3, 0, 0, 6, 8);
  std::vector<int32_t> joined;
  for (int m = 0; m < 3; ++m) {
    const Batch part = MicroBatch(b, m, 3);
    EXPECT_EQ(part.batch_size, 2);
    joined.insert(joined.end(), part.inputs.begin(), part.inputs.end());
  }
  EXPECT_EQ(joined, b.inputs);
}

TEST(DataTest, LoadsDirectoriesInPathOrderAndNamesErrors) {
  const fs::path dir = fs::path(::testing::TempDir()) / "switchyard_data_test";
  fs::remove_all(dir);
  fs::create_directories(dir / "sub");
  std::ofstream(dir / "b.txt") << Text(3000);
  std::ofstream(dir / "a.txt") << Text(3000);
  std::ofstream(dir / "sub" / "c.txt") << Text(3000);
  auto corpus = ByteCorpus::Load(dir.string(), 0.05, 64);
  ASSERT_TRUE(corpus.ok()) << corpus.status().ToString();
  EXPECT_EQ(corpus->num_files(), 3);
  // Three files, each split 95/5 on its own and joined with '\n' per split.
  EXPECT_EQ(corpus->train_bytes(), 3 * 2850u + 2);
  EXPECT_EQ(corpus->validation_bytes(), 3 * 150u + 2);
  ASSERT_EQ(corpus->sources().size(), 3u);
  EXPECT_EQ(corpus->sources()[0].name, "a.txt");
  EXPECT_EQ(corpus->sources()[2].name, "sub/c.txt");
  EXPECT_EQ(corpus->sources()[1].size, 150u);

  auto missing = ByteCorpus::Load((dir / "nope").string(), 0.05, 64);
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  std::ofstream(dir / "tiny.txt") << "short";
  auto tiny = ByteCorpus::Load((dir / "tiny.txt").string(), 0.1, 64);
  EXPECT_EQ(tiny.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(tiny.status().message().find("corpus of 5 bytes is too small"),
            std::string::npos)
      << tiny.status().message();
  fs::create_directories(dir / "empty");
  EXPECT_EQ(ByteCorpus::Load((dir / "empty").string(), 0.1, 8).status().code(),
            StatusCode::kInvalidArgument);
  fs::remove_all(dir);
}

TEST(DataTest, EverySourceIsInBothSplits) {
  const fs::path dir = fs::path(::testing::TempDir()) / "switchyard_sources";
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "en.txt") << std::string(2000, 'e');
  std::ofstream(dir / "zh.txt") << std::string(2000, 'z');
  auto corpus = ByteCorpus::Load(dir.string(), 0.1, 16);
  ASSERT_TRUE(corpus.ok()) << corpus.status().ToString();
  for (int s = 0; s < 2; ++s) {
    const char want = s == 0 ? 'e' : 'z';
    const Batch b = corpus->SourceBatch(s, 4, 16);
    ASSERT_EQ(b.batch_size, 4);
    for (int32_t t : b.inputs) EXPECT_EQ(t, want) << "source " << s;
  }
  // Validation draws from both languages, not only the last file.
  const Batch v = corpus->ValidationBatch(0, 20, 16);
  std::set<int32_t> seen(v.inputs.begin(), v.inputs.end());
  EXPECT_TRUE(seen.count('e') && seen.count('z'));
  EXPECT_EQ(corpus->SourceBatch(0, 4, 500).batch_size, 0)
      << "a source shorter than a window gives an empty batch";
  fs::remove_all(dir);
}

}  // namespace
}  // namespace switchyard::trainer
