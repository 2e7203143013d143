// Fuzzes the safetensors reader (storage/safetensors.h) as
// `checkpoint.init_from` and `switchyard ckpt import` use it: Open on a
// file (or a directory with an index) written from the input, then Names,
// Shape, CheckShape and Read of every tensor.
//
// Input: byte 0 even: the rest is one .safetensors file. Odd: the rest is
// a directory: model.safetensors.index.json and model-00001.safetensors,
// each a 4-byte little-endian length and the bytes, then (the rest)
// model-00002.safetensors.
// Checks: every tensor Open lists reads back with its shape, as fp32.
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <string>
#include <string_view>

#include "fuzz/fuzz_support.h"
#include "storage/safetensors.h"

namespace {

void WriteFile(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  FUZZ_CHECK(out.good());
}

// The next part of `*rest`: a 4-byte little-endian length and as many of
// the bytes as there are.
std::string_view NextPart(std::string_view* rest) {
  uint64_t n = 0;
  for (int i = 0; i < 4 && !rest->empty(); ++i) {
    n |= uint64_t{static_cast<uint8_t>(rest->front())} << (8 * i);
    rest->remove_prefix(1);
  }
  const std::string_view part = rest->substr(0, n);
  rest->remove_prefix(part.size());
  return part;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  switchyard::fuzz::QuietLogging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace switchyard;
  if (size < 1) return 0;
  std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  const std::string& dir = fuzz::TempDir();
  std::string path;
  if (data[0] % 2 == 0) {
    path = dir + "/model.safetensors";
    WriteFile(path, rest);
  } else {
    path = dir + "/model";
    std::filesystem::create_directories(path);
    WriteFile(path + "/model.safetensors.index.json", NextPart(&rest));
    WriteFile(path + "/model-00001.safetensors", NextPart(&rest));
    WriteFile(path + "/model-00002.safetensors", rest);
  }
  auto reader = storage::SafetensorsReader::Open(path);
  if (!reader.ok()) {
    FUZZ_CHECK(!reader.status().message().empty());
    return 0;
  }
  for (const std::string& name : reader->Names()) {
    FUZZ_CHECK(reader->Has(name));
    auto shape = reader->Shape(name);
    FUZZ_CHECK(shape.ok());
    FUZZ_CHECK(reader->CheckShape(name, *shape).ok());
    FUZZ_CHECK(!reader->CheckShape(name, {-1}).ok());
    auto tensor = reader->Read(name, *shape);
    FUZZ_CHECK(tensor.ok());
    FUZZ_CHECK(tensor->dtype() == DType::kF32);
    FUZZ_CHECK(tensor->shape() == *shape);
  }
  FUZZ_CHECK(!reader->Read("\x01 no such tensor").ok());
  return 0;
}
