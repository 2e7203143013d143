#include "storage/safetensors.h"

#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

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

Status SafetensorsReader::AddFile(const std::string& path,
                                  std::map<std::string, Entry>* where) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError("cannot open " + path);
  unsigned char size[8];
  if (!in.read(reinterpret_cast<char*>(size), 8)) {
    return DataLossError(path + " is too short for a safetensors header");
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | size[i];
  const uint64_t file_size = fs::file_size(path);
  if (n > file_size - 8 || n > (uint64_t{100} << 20)) {
    return DataLossError(path + ": header size " + std::to_string(n) +
                         " does not fit the file");
  }
  std::string json(n, '\0');
  in.read(json.data(), static_cast<std::streamsize>(n));
  google::protobuf::Struct header;
  if (!google::protobuf::util::JsonStringToMessage(json, &header).ok()) {
    return DataLossError(path + ": the header is not JSON");
  }
  for (const auto& [name, value] : header.fields()) {
    if (name == "__metadata__") continue;
    const auto& f = value.struct_value().fields();
    Entry e;
    e.file = path;
    const std::string dtype =
        f.count("dtype") ? f.at("dtype").string_value() : "";
    if (dtype != "F32" && dtype != "BF16") {
      return InvalidArgumentError(path + ": tensor " + name + " is " +
                                  (dtype.empty() ? "untyped" : dtype) +
                                  "; F32 and BF16 are read");
    }
    e.dtype = dtype == "F32" ? DType::kF32 : DType::kBF16;
    int64_t count = 1;
    if (f.count("shape")) {
      for (const auto& d : f.at("shape").list_value().values()) {
        e.shape.push_back(static_cast<int64_t>(d.number_value()));
        count *= e.shape.back();
      }
    }
    const auto& off =
        f.count("data_offsets")
            ? f.at("data_offsets").list_value().values()
            : google::protobuf::RepeatedPtrField<google::protobuf::Value>();
    if (off.size() != 2) {
      return DataLossError(path + ": tensor " + name + " has no data_offsets");
    }
    e.begin = 8 + n + static_cast<uint64_t>(off[0].number_value());
    e.end = 8 + n + static_cast<uint64_t>(off[1].number_value());
    if (e.end < e.begin || e.end > file_size ||
        e.end - e.begin != static_cast<uint64_t>(count) * DTypeBytes(e.dtype)) {
      return DataLossError(path + ": tensor " + name +
                           " has a byte range that does not match its shape");
    }
    (*where)[name] = std::move(e);
  }
  return OkStatus();
}

StatusOr<SafetensorsReader> SafetensorsReader::Open(const std::string& path) {
  SafetensorsReader reader;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    const std::string index = path + "/model.safetensors.index.json";
    std::ifstream in(index);
    if (!in) return NotFoundError("no " + index);
    std::stringstream s;
    s << in.rdbuf();
    google::protobuf::Struct json;
    if (!google::protobuf::util::JsonStringToMessage(s.str(), &json).ok() ||
        !json.fields().count("weight_map")) {
      return DataLossError(index + " is not a safetensors index");
    }
    std::set<std::string> files;
    for (const auto& [name, file] :
         json.fields().at("weight_map").struct_value().fields()) {
      files.insert(file.string_value());
    }
    for (const std::string& file : files) {
      RETURN_IF_ERROR(AddFile(path + "/" + file, &reader.where_));
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
