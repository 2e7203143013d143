// Power loss under the real RocksDB engine (tests/testing/power_loss_fs.h):
// the file system itself, and RocksDB's sync on it.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>

#include "storage/kv_store.h"
#include "tests/testing/power_loss_fs.h"

namespace switchyard {
namespace {

namespace fs = std::filesystem;
using switchyard::testing::PowerLossFileSystem;

class PowerLossTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(
               ::testing::TempDir() + "/switchyard_power_" +
               std::to_string(::getpid()) + "_" +
               ::testing::UnitTest::GetInstance()->current_test_info()->name())
               .lexically_normal()
               .string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // An empty directory for one run.
  std::string Fresh(const std::string& name) {
    const std::string d = dir_ + "/" + name;
    fs::remove_all(d);
    fs::create_directories(d);
    return d;
  }

  std::string dir_;
};

// --- The tool itself, on plain files.

// Writes `bytes` to a new file through `fs`, syncing it when `sync`.
void WriteFile(rocksdb::FileSystem& fs, const std::string& path,
               const std::string& bytes, bool sync) {
  std::unique_ptr<rocksdb::FSWritableFile> f;
  ASSERT_TRUE(fs.NewWritableFile(path, {}, &f, nullptr).ok());
  ASSERT_TRUE(f->Append(bytes, {}, nullptr).ok());
  if (sync) {
    ASSERT_TRUE(f->Sync({}, nullptr).ok());
  }
  ASSERT_TRUE(f->Close({}, nullptr).ok());
}
void SyncDir(rocksdb::FileSystem& fs, const std::string& dir) {
  std::unique_ptr<rocksdb::FSDirectory> d;
  ASSERT_TRUE(fs.NewDirectory(dir, {}, &d, nullptr).ok());
  ASSERT_TRUE(d->Fsync({}, nullptr).ok());
}
std::string Contents(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST_F(PowerLossTest, TheFileSystemDropsWhatWasNotSynced) {
  PowerLossFileSystem plfs(rocksdb::FileSystem::Default());
  const std::string d = dir_ + "/d";
  ASSERT_TRUE(plfs.CreateDir(d, {}, nullptr).ok());
  SyncDir(plfs, dir_);
  WriteFile(plfs, d + "/synced", "durable", /*sync=*/true);
  WriteFile(plfs, d + "/unsynced", "lost", /*sync=*/false);
  SyncDir(plfs, d);
  {  // Appended after the last sync: cut off.
    std::unique_ptr<rocksdb::FSWritableFile> f;
    ASSERT_TRUE(plfs.ReopenWritableFile(d + "/synced", {}, &f, nullptr).ok());
    ASSERT_TRUE(f->Append("+tail", {}, nullptr).ok());
    ASSERT_TRUE(f->Close({}, nullptr).ok());
  }
  WriteFile(plfs, d + "/new", "synced, its name not", /*sync=*/true);
  WriteFile(plfs, d + "/tmp", "replacement", /*sync=*/true);
  ASSERT_TRUE(plfs.RenameFile(d + "/tmp", d + "/unsynced", {}, nullptr).ok());
  ASSERT_TRUE(plfs.CreateDir(d + "/sub", {}, nullptr).ok());
  WriteFile(plfs, d + "/sub/f", "x", /*sync=*/true);
  SyncDir(plfs, d + "/sub");
  EXPECT_EQ(plfs.operations(), 22u);
  plfs.CutPowerNow();
  EXPECT_FALSE(plfs.DeleteFile(d + "/synced", {}, nullptr).ok());
  EXPECT_EQ(plfs.first_refused(), "delete " + d + "/synced");

  ASSERT_TRUE(plfs.DropUnsyncedData().ok());
  EXPECT_EQ(Contents(d + "/synced"), "durable");
  EXPECT_EQ(Contents(d + "/unsynced"), "");  // Its bytes never synced.
  EXPECT_FALSE(fs::exists(d + "/new"));
  EXPECT_FALSE(fs::exists(d + "/tmp"));  // Renamed back, then not created.
  EXPECT_FALSE(fs::exists(d + "/sub"));  // Its parent was not synced.
  EXPECT_EQ(plfs.operations(), 0u);
  EXPECT_FALSE(plfs.power_cut());
}

TEST_F(PowerLossTest, AnUnsyncedRocksDbWriteIsLostAndASyncedOneIsNot) {
  // The harness can fail: RocksDB's sync option is what keeps a write.
  for (bool sync : {false, true}) {
    const std::string db = Fresh(sync ? "synced" : "unsynced") + "/db";
    auto plfs =
        std::make_shared<PowerLossFileSystem>(rocksdb::FileSystem::Default());
    {
      auto kv = storage::OpenRocksKvStore(db, plfs);
      ASSERT_TRUE(kv.ok()) << kv.status().ToString();
      ASSERT_TRUE((*kv)->Put("k", "v", sync).ok());
      plfs->CutPowerNow();
    }
    ASSERT_TRUE(plfs->DropUnsyncedData().ok());
    auto kv = storage::OpenRocksKvStore(db);
    ASSERT_TRUE(kv.ok()) << kv.status().ToString();
    auto v = (*kv)->Get("k");
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(v->has_value(), sync);
  }
}

}  // namespace
}  // namespace switchyard
