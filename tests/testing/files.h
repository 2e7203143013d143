// Test helpers for files and stores on disk. Header-only.
#ifndef SWITCHYARD_TESTS_TESTING_FILES_H_
#define SWITCHYARD_TESTS_TESTING_FILES_H_

#include <fstream>
#include <string>
#include <utility>

#include "common/files.h"
#include "common/status.h"
#include "storage/kv_store.h"

namespace switchyard::testing {

// The whole file ("" if it cannot be read): ReadFileToString for tests
// that only compare or print what they read.
inline std::string ReadFile(const std::string& path) {
  StatusOr<std::string> bytes = ReadFileToString(path);
  return bytes.ok() ? std::move(bytes).value() : std::string();
}

// Training text in two "languages" (so that routing has something to
// learn) in `dir`, which must exist: en.txt and ru.txt, 400 lines each.
inline void WriteTwoLanguageCorpus(const std::string& dir) {
  std::ofstream en(dir + "/en.txt");
  std::ofstream ru(dir + "/ru.txt");
  for (int i = 0; i < 400; ++i) {
    en << "the quick brown fox " << i << " jumps over the lazy dog.\n";
    ru << "съешь же ещё этих мягких французских булок " << i << "\n";
  }
}

// Flips bit `mask` of byte `offset` in the value of the first key under
// `prefix` of the RocksDB database at `db`, behind any store's back (its
// own block checksums stay consistent). Fails when there is no such key.
inline Status FlipStoredByte(const std::string& db, const std::string& prefix,
                             size_t offset, char mask) {
  ASSIGN_OR_RETURN(auto kv, storage::OpenRocksKvStore(db));
  std::string key, value;
  RETURN_IF_ERROR(
      kv->ScanPrefix(prefix, [&](const std::string& k, const std::string& v) {
        if (key.empty()) key = k, value = v;
      }));
  if (key.empty() || value.size() <= offset) {
    return NotFoundError("no value to corrupt under " + prefix);
  }
  value[offset] ^= mask;
  return kv->Put(key, value, /*sync=*/true);
}

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_TESTING_FILES_H_
