#include "storage/safetensors.h"

#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <utility>

#include "common/files.h"

namespace switchyard::storage {

namespace fs = std::filesystem;

Status WriteSafetensors(const std::string& path,
                        const std::vector<NamedArray>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  std::ostringstream header;
  header << "{\"__metadata__\":{";
  bool first = true;
  for (const auto& [k, v] : metadata) {
    header << (first ? "" : ",") << "\"" << k << "\":\"" << v << "\"";
    first = false;
  }
  header << "}";
  uint64_t offset = 0;
  for (const NamedArray& e : tensors) {
    header << ",\"" << e.name << "\":{\"dtype\":\""
           << (e.tensor.dtype() == DType::kF32 ? "F32" : "BF16")
           << "\",\"shape\":[";
    for (size_t i = 0; i < e.tensor.shape().size(); ++i) {
      header << (i ? "," : "") << e.tensor.shape()[i];
    }
    header << "],\"data_offsets\":[" << offset << ","
           << offset + e.tensor.num_bytes() << "]}";
    offset += e.tensor.num_bytes();
  }
  header << "}";
  std::string json = header.str();
  while (json.size() % 8 != 0) json += ' ';
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const uint64_t n = json.size();
  unsigned char size[8];
  for (int i = 0; i < 8; ++i)
    size[i] = static_cast<unsigned char>(n >> (8 * i));
  out.write(reinterpret_cast<const char*>(size), 8);
  out.write(json.data(), static_cast<std::streamsize>(json.size()));
  for (const NamedArray& e : tensors) {
    out.write(static_cast<const char*>(e.tensor.data()),
              static_cast<std::streamsize>(e.tensor.num_bytes()));
  }
  out.close();
  if (!out) return UnavailableError("cannot write " + path);
  return OkStatus();
}

namespace {

// A header larger than this is refused before it is read (an export of
// tens of thousands of tensors has a header of a few MiB).
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;
constexpr uint64_t kMaxIndexBytes = uint64_t{100} << 20;
// Integers in JSON headers are doubles; above 2^53 they are not exact.
constexpr double kMaxJsonInteger = 9007199254740992.0;

// The keys of the top-level object of `json`, in order, repeats included
// (JSON parsers keep one of two equal keys; safetensors must not). Meant
// for well-formed JSON, and harmless on the rest (which fails to parse).
std::vector<std::string> TopLevelKeys(const std::string& json) {
  std::vector<std::string> keys;
  int depth = 0;
  bool expect_key = false;
  for (size_t i = 0; i < json.size(); ++i) {
    const char c = json[i];
    if (c == '"') {
      std::string text;
      for (++i; i < json.size() && json[i] != '"'; ++i) {
        if (json[i] == '\\' && i + 1 < json.size()) text += json[i++];
        text += json[i];
      }
      if (depth == 1 && expect_key) keys.push_back(text);
      expect_key = false;
    } else if (c == '{' || c == '[') {
      ++depth;
      expect_key = depth == 1 && c == '{';
    } else if (c == '}' || c == ']') {
      --depth;
    } else if (c == ',' && depth == 1) {
      expect_key = true;
    }
  }
  return keys;
}

// A JSON number that is a non-negative integer (exactly), else -1.
int64_t NonNegativeInteger(const google::protobuf::Value& v) {
  if (v.kind_case() != google::protobuf::Value::kNumberValue) return -1;
  const double d = v.number_value();
  if (!(d >= 0) || d > kMaxJsonInteger || d != std::floor(d)) return -1;
  return static_cast<int64_t>(d);
}

}  // namespace

std::string FormatShape(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return out + (shape.size() == 1 ? ",)" : ")");
}

Status SafetensorsReader::AddFile(const std::string& path,
                                  std::map<std::string, Entry>* where) {
  ASSIGN_OR_RETURN(const uint64_t file_size, RegularFileSize(path));
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError("cannot open " + path);
  unsigned char size[8];
  if (file_size < 8 || !in.read(reinterpret_cast<char*>(size), 8)) {
    return DataLossError(path + " is too short for a safetensors header");
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | size[i];
  if (n > file_size - 8 || n > kMaxHeaderBytes) {
    return DataLossError(path + ": header size " + std::to_string(n) +
                         " does not fit the file (" +
                         std::to_string(file_size) + " bytes; at most " +
                         std::to_string(kMaxHeaderBytes) + " are read)");
  }
  std::string json(n, '\0');
  if (!in.read(json.data(), static_cast<std::streamsize>(n))) {
    return DataLossError(path + ": cannot read the header");
  }
  // Before parsing: a JSON parser keeps one of two equal keys, or fails
  // without saying why.
  std::set<std::string> seen;
  for (const std::string& name : TopLevelKeys(json)) {
    if (!seen.insert(name).second) {
      return DataLossError(path + ": tensor " + name +
                           " appears twice in the header");
    }
  }
  google::protobuf::Struct header;
  if (!google::protobuf::util::JsonStringToMessage(json, &header).ok()) {
    return DataLossError(path + ": the header is not a JSON object");
  }
  const uint64_t data_bytes = file_size - 8 - n;
  // Byte ranges within the data section, to check that they tile it.
  std::vector<std::pair<std::pair<uint64_t, uint64_t>, std::string>> ranges;
  for (const auto& [name, value] : header.fields()) {
    if (name == "__metadata__") continue;
    const std::string tensor = path + ": tensor " + name;
    if (where->count(name)) {
      return DataLossError(tensor + " is also in " + where->at(name).file);
    }
    if (value.kind_case() != google::protobuf::Value::kStructValue) {
      return DataLossError(tensor + " is not described by an object");
    }
    const auto& f = value.struct_value().fields();
    Entry e;
    e.file = path;
    const std::string dtype =
        f.count("dtype") ? f.at("dtype").string_value() : "";
    if (dtype != "F32" && dtype != "BF16") {
      return InvalidArgumentError(tensor + " is " +
                                  (dtype.empty() ? "untyped" : dtype) +
                                  "; F32 and BF16 are read");
    }
    e.dtype = dtype == "F32" ? DType::kF32 : DType::kBF16;
    if (!f.count("shape") ||
        f.at("shape").kind_case() != google::protobuf::Value::kListValue) {
      return DataLossError(tensor + " has no shape");
    }
    for (const auto& d : f.at("shape").list_value().values()) {
      const int64_t dim = NonNegativeInteger(d);
      if (dim < 0) {
        return DataLossError(tensor + " has a dimension that is not a " +
                             "non-negative integer (" +
                             std::to_string(d.number_value()) + ")");
      }
      e.shape.push_back(dim);
    }
    // Elements; each takes at least a byte, so more than the file's bytes
    // (or an overflow) is refused before anything is allocated.
    uint64_t count = 1;
    if (std::find(e.shape.begin(), e.shape.end(), 0) != e.shape.end()) {
      count = 0;
    } else {
      for (int64_t dim : e.shape) {
        if (__builtin_mul_overflow(count, static_cast<uint64_t>(dim), &count) ||
            count > data_bytes) {
          return DataLossError(tensor + " has shape " + FormatShape(e.shape) +
                               ", more elements than the file has bytes");
        }
      }
    }
    const auto& off =
        f.count("data_offsets")
            ? f.at("data_offsets").list_value().values()
            : google::protobuf::RepeatedPtrField<google::protobuf::Value>();
    if (off.size() != 2) {
      return DataLossError(tensor + " has no data_offsets [begin, end]");
    }
    const int64_t begin = NonNegativeInteger(off[0]);
    const int64_t end = NonNegativeInteger(off[1]);
    if (begin < 0 || end < 0) {
      return DataLossError(tensor + " has data_offsets that are not " +
                           "non-negative integers");
    }
    if (begin > end) {
      return DataLossError(tensor + " has data_offsets [" +
                           std::to_string(begin) + ", " + std::to_string(end) +
                           "] that begin after they end");
    }
    if (static_cast<uint64_t>(end) > data_bytes) {
      return DataLossError(tensor + " has data_offsets [" +
                           std::to_string(begin) + ", " + std::to_string(end) +
                           "] beyond the file's " + std::to_string(data_bytes) +
                           " data bytes");
    }
    const uint64_t bytes = count * DTypeBytes(e.dtype);
    if (static_cast<uint64_t>(end - begin) != bytes) {
      return DataLossError(tensor + " has " + std::to_string(end - begin) +
                           " bytes; its shape " + FormatShape(e.shape) +
                           " of " + dtype + " needs " + std::to_string(bytes));
    }
    e.begin = 8 + n + static_cast<uint64_t>(begin);
    e.end = 8 + n + static_cast<uint64_t>(end);
    ranges.push_back({{begin, end}, name});
    (*where)[name] = std::move(e);
  }
  // The tensors' bytes tile the data section: no overlap, no gap, nothing
  // after the last (as the safetensors format requires).
  std::sort(ranges.begin(), ranges.end());
  uint64_t at = 0;
  std::string previous;
  for (const auto& [range, name] : ranges) {
    if (range.first != at) {
      return DataLossError(
          path + ": tensor " + name + " has data_offsets [" +
          std::to_string(range.first) + ", " + std::to_string(range.second) +
          "] that " + (range.first < at ? "overlap" : "leave a gap after") +
          " " + (previous.empty() ? "the start of the data" : previous) +
          " (which ends at " + std::to_string(at) + ")");
    }
    at = range.second;
    previous = name;
  }
  if (at != data_bytes) {
    return DataLossError(path + ": the tensors' data ends at byte " +
                         std::to_string(at) + " of " +
                         std::to_string(data_bytes) +
                         "; the rest belongs to no tensor");
  }
  return OkStatus();
}

StatusOr<SafetensorsReader> SafetensorsReader::Open(const std::string& path) {
  SafetensorsReader reader;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    const std::string index = path + "/model.safetensors.index.json";
    auto text = ReadRegularFile(index, kMaxIndexBytes);
    if (!text.ok()) {
      return text.status().WithContext(
          path + " is a directory without a readable safetensors index");
    }
    google::protobuf::Struct json;
    if (!google::protobuf::util::JsonStringToMessage(*text, &json).ok() ||
        !json.fields().count("weight_map") ||
        json.fields().at("weight_map").kind_case() !=
            google::protobuf::Value::kStructValue) {
      return DataLossError(index + " is not a safetensors index");
    }
    const auto& weight_map =
        json.fields().at("weight_map").struct_value().fields();
    std::set<std::string> files;
    for (const auto& [name, file] : weight_map) {
      const std::string f = file.string_value();
      if (f.empty() || f[0] == '/' || f.find("..") != std::string::npos) {
        return DataLossError(index + ": tensor " + name + " is in '" + f +
                             "', not a file of " + path);
      }
      files.insert(f);
    }
    for (const std::string& file : files) {
      RETURN_IF_ERROR(AddFile(path + "/" + file, &reader.where_));
    }
    for (const auto& [name, file] : weight_map) {
      auto it = reader.where_.find(name);
      if (it == reader.where_.end() ||
          it->second.file != path + "/" + file.string_value()) {
        return DataLossError(index + ": tensor " + name + " is not in " +
                             file.string_value());
      }
    }
  } else {
    RETURN_IF_ERROR(AddFile(path, &reader.where_));
  }
  return reader;
}

std::vector<std::string> SafetensorsReader::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, e] : where_) names.push_back(name);
  return names;
}

StatusOr<std::vector<int64_t>> SafetensorsReader::Shape(
    const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) return NotFoundError("no tensor " + name);
  return it->second.shape;
}

Status SafetensorsReader::CheckShape(
    const std::string& name, const std::vector<int64_t>& expected) const {
  auto it = where_.find(name);
  if (it == where_.end()) return NotFoundError("no tensor " + name);
  if (it->second.shape == expected) return OkStatus();
  return FailedPreconditionError(
      it->second.file + ": tensor " + name + " has shape " +
      FormatShape(it->second.shape) + "; the model expects " +
      FormatShape(expected) +
      " (Switchyard computes y = x @ W and stores W as (in_features, "
      "out_features): a PyTorch nn.Linear weight, (out_features, "
      "in_features), must be transposed)");
}

StatusOr<Tensor> SafetensorsReader::Read(
    const std::string& name, const std::vector<int64_t>& expected) const {
  RETURN_IF_ERROR(CheckShape(name, expected));
  return Read(name);
}

StatusOr<Tensor> SafetensorsReader::Read(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) return NotFoundError("no tensor " + name);
  const Entry& e = it->second;
  ASSIGN_OR_RETURN(Tensor t, Tensor::Zeros(e.dtype, e.shape));
  std::ifstream in(e.file, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(e.begin));
  if (!in.read(static_cast<char*>(t.data()),
               static_cast<std::streamsize>(e.end - e.begin))) {
    return DataLossError("cannot read " + name + " from " + e.file);
  }
  return e.dtype == DType::kF32 ? t : t.To(DType::kF32);
}

}  // namespace switchyard::storage
