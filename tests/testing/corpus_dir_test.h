// Test fixture: a fresh directory of this test process holding the
// two-language training corpus in `dir_/data`, removed afterwards.
// Header-only.
#ifndef SWITCHYARD_TESTS_TESTING_CORPUS_DIR_TEST_H_
#define SWITCHYARD_TESTS_TESTING_CORPUS_DIR_TEST_H_

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <utility>

#include "tests/testing/files.h"

namespace switchyard::testing {

class CorpusDirTest : public ::testing::Test {
 protected:
  // The directory is <TempDir>/switchyard_<tag>_<pid>.
  explicit CorpusDirTest(std::string tag) : tag_(std::move(tag)) {}

  void SetUp() override {
    dir_ = ::testing::TempDir() + "/switchyard_" + tag_ + "_" +
           std::to_string(::getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_ + "/data");
    WriteTwoLanguageCorpus(dir_ + "/data");
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string dir_;

 private:
  const std::string tag_;
};

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_TESTING_CORPUS_DIR_TEST_H_
