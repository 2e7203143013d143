// The safetensors reader: round trips, and every malformed header refused
// at Open naming the file and the tensor, before anything is allocated.
#include "storage/safetensors.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

namespace switchyard::storage {
namespace {

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/switchyard_st_" + std::to_string(::getpid()) +
         "_" + name;
}

// A safetensors file with `header` (its size as the 8-byte prefix, or
// `claimed_header_bytes` when set) and `data_bytes` zero bytes after it.
void WriteRaw(const std::string& path, const std::string& header,
              uint64_t data_bytes, uint64_t claimed_header_bytes = 0) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const uint64_t n =
      claimed_header_bytes ? claimed_header_bytes : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>(n >> (8 * i)));
  out << header << std::string(data_bytes, '\0');
}

struct BadHeader {
  const char* name;
  const char* header;
  uint64_t data_bytes;
  const char* expected;  // A part of the message, after "<path>: ".
};

class SafetensorsBadHeaderTest : public ::testing::TestWithParam<BadHeader> {};

TEST_P(SafetensorsBadHeaderTest, IsRefusedNamingFileAndTensor) {
  const BadHeader& c = GetParam();
  const std::string path = TempPath(std::string(c.name) + ".safetensors");
  WriteRaw(path, c.header, c.data_bytes);
  auto reader = SafetensorsReader::Open(path);
  std::filesystem::remove(path);
  ASSERT_FALSE(reader.ok()) << c.name;
  EXPECT_NE(reader.status().message().find(path + ": " + c.expected),
            std::string::npos)
      << reader.status().message();
}

#define F32(shape, begin, end)                                                \
  "{\"dtype\":\"F32\",\"shape\":" shape ",\"data_offsets\":[" #begin "," #end \
  "]}"

INSTANTIATE_TEST_SUITE_P(
    Cases, SafetensorsBadHeaderTest,
    ::testing::Values(
        BadHeader{"negative", "{\"a\":" F32("[-2,2]", 0, 16) "}", 16,
                  "tensor a has a dimension that is not a non-negative "
                  "integer (-2.000000)"},
        BadHeader{"fraction", "{\"a\":" F32("[1.5]", 0, 4) "}", 4,
                  "tensor a has a dimension that is not a non-negative "
                  "integer"},
        BadHeader{"overflow",
                  "{\"a\":" F32("[4294967296,4294967296,16]", 0, 16) "}", 16,
                  "tensor a has shape (4294967296, 4294967296, 16), more "
                  "elements than the file has bytes"},
        BadHeader{"overlap",
                  "{\"a\":" F32("[4]", 0, 16) ",\"b\":" F32("[4]", 8, 24) "}",
                  24,
                  "tensor b has data_offsets [8, 24] that overlap a (which "
                  "ends at 16)"},
        BadHeader{"gap",
                  "{\"a\":" F32("[4]", 0, 16) ",\"b\":" F32("[4]", 20, 36) "}",
                  36,
                  "tensor b has data_offsets [20, 36] that leave a gap after "
                  "a (which ends at 16)"},
        BadHeader{"late_start", "{\"a\":" F32("[4]", 4, 20) "}", 20,
                  "tensor a has data_offsets [4, 20] that leave a gap after "
                  "the start of the data"},
        BadHeader{"out_of_bounds", "{\"a\":" F32("[4]", 0, 16) "}", 8,
                  "tensor a has data_offsets [0, 16] beyond the file's 8 data "
                  "bytes"},
        BadHeader{"begin_after_end", "{\"a\":" F32("[4]", 16, 0) "}", 16,
                  "tensor a has data_offsets [16, 0] that begin after they "
                  "end"},
        BadHeader{"size_mismatch", "{\"a\":" F32("[3]", 0, 16) "}", 16,
                  "tensor a has 16 bytes; its shape (3,) of F32 needs 12"},
        BadHeader{"trailing", "{\"a\":" F32("[4]", 0, 16) "}", 20,
                  "the tensors' data ends at byte 16 of 20; the rest belongs "
                  "to no tensor"},
        BadHeader{"duplicate",
                  "{\"a\":" F32("[4]", 0, 16) ",\"a\":" F32("[4]", 16, 32) "}",
                  32, "tensor a appears twice in the header"},
        BadHeader{"f16",
                  "{\"a\":{\"dtype\":\"F16\",\"shape\":[4],"
                  "\"data_offsets\":[0,8]}}",
                  8, "tensor a is F16; F32 and BF16 are read"},
        BadHeader{"no_offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4]}}", 16,
                  "tensor a has no data_offsets [begin, end]"},
        BadHeader{"not_an_object", "{\"a\":3}", 0,
                  "tensor a is not described by an object"},
        BadHeader{"not_json", "{\"a\":", 0, "the header is not a JSON object"}),
    [](const ::testing::TestParamInfo<BadHeader>& info) {
      return std::string(info.param.name);
    });

TEST(SafetensorsTest, HeaderSizeLargerThanTheFileIsRefused) {
  const std::string path = TempPath("huge_header.safetensors");
  WriteRaw(path, "{}", 0, uint64_t{1} << 40);
  auto reader = SafetensorsReader::Open(path);
  std::filesystem::remove(path);
  ASSERT_FALSE(reader.ok());
  EXPECT_NE(reader.status().message().find(
                path + ": header size 1099511627776 does not fit the file"),
            std::string::npos)
      << reader.status().message();
  const std::string short_path = TempPath("short.safetensors");
  std::ofstream(short_path) << "abc";
  auto short_reader = SafetensorsReader::Open(short_path);
  std::filesystem::remove(short_path);
  ASSERT_FALSE(short_reader.ok());
  EXPECT_EQ(short_reader.status().message(),
            short_path + " is too short for a safetensors header");
}

// Devices, FIFOs and directories without an index are refused before they
// are opened (a FIFO would block, a device never end).
TEST(SafetensorsTest, ReadsRegularFilesOnly) {
  for (const char* path : {"/dev/zero", "/dev/urandom", "/dev/null"}) {
    auto reader = SafetensorsReader::Open(path);
    ASSERT_FALSE(reader.ok()) << path;
    EXPECT_EQ(reader.status().message(),
              "'" + std::string(path) +
                  "' is a character device, not a regular file");
  }
  const std::string fifo = TempPath("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto from_fifo = SafetensorsReader::Open(fifo);
  ::unlink(fifo.c_str());
  ASSERT_FALSE(from_fifo.ok());
  EXPECT_EQ(from_fifo.status().message(),
            "'" + fifo + "' is a FIFO, not a regular file");

  const std::string dir = TempPath("dir");
  std::filesystem::create_directories(dir + "/model.safetensors.index.json");
  auto from_dir = SafetensorsReader::Open(dir);
  EXPECT_FALSE(from_dir.ok());
  EXPECT_NE(from_dir.status().message().find("is a directory, not a regular "
                                             "file"),
            std::string::npos)
      << from_dir.status().message();
  std::filesystem::remove_all(dir);
  auto missing = SafetensorsReader::Open(dir);
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
}

TEST(SafetensorsTest, TensorInTwoFilesOfADirectoryIsRefused) {
  const std::string dir = TempPath("two_files");
  std::filesystem::create_directories(dir);
  Tensor t = Tensor::Zeros(DType::kF32, {2, 2}).value();
  ASSERT_TRUE(WriteSafetensors(dir + "/x.safetensors", {{"a", t}}, {}).ok());
  ASSERT_TRUE(WriteSafetensors(dir + "/y.safetensors", {{"a", t}}, {}).ok());
  std::ofstream(dir + "/model.safetensors.index.json")
      << "{\"weight_map\":{\"a\":\"x.safetensors\",\"b\":\"y.safetensors\"}}";
  auto reader = SafetensorsReader::Open(dir);
  ASSERT_FALSE(reader.ok());
  EXPECT_EQ(
      reader.status().message(),
      dir + "/y.safetensors: tensor a is also in " + dir + "/x.safetensors");
  std::ofstream(dir + "/model.safetensors.index.json")
      << "{\"weight_map\":{\"a\":\"../x.safetensors\"}}";
  auto outside = SafetensorsReader::Open(dir);
  ASSERT_FALSE(outside.ok());
  EXPECT_NE(outside.status().message().find("not a file of " + dir),
            std::string::npos)
      << outside.status().message();
  std::filesystem::remove_all(dir);
}

TEST(SafetensorsTest, RoundTripAndFullShapeCheck) {
  const std::string path = TempPath("round_trip.safetensors");
  Tensor w = Tensor::Zeros(DType::kF32, {2, 3}).value();
  for (int i = 0; i < 6; ++i) w.f32()[i] = static_cast<float>(i);
  Tensor empty = Tensor::Zeros(DType::kF32, {0, 3}).value();
  Tensor bf = w.To(DType::kBF16);
  ASSERT_TRUE(
      WriteSafetensors(path, {{"w", w}, {"empty", empty}, {"bf", bf}}, {})
          .ok());
  auto reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  auto read = reader->Read("w", {2, 3});
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  EXPECT_EQ(read->f32()[5], 5.0f);
  EXPECT_EQ(reader->Read("bf")->f32()[4], 4.0f);
  EXPECT_TRUE(reader->CheckShape("empty", {0, 3}).ok());
  // Same element count, transposed: refused, with the orientation.
  Status transposed = reader->CheckShape("w", {3, 2});
  EXPECT_EQ(transposed.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(transposed.message(),
            path +
                ": tensor w has shape (2, 3); the model expects (3, 2) "
                "(Switchyard computes y = x @ W and stores W as "
                "(in_features, out_features): a PyTorch nn.Linear weight, "
                "(out_features, in_features), must be transposed)");
  EXPECT_FALSE(reader->Read("w", {6}).ok());
  EXPECT_EQ(reader->CheckShape("nope", {1}).code(), StatusCode::kNotFound);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace switchyard::storage
