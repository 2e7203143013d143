// safetensors files (https://github.com/huggingface/safetensors): an 8-byte
// little-endian header size, a JSON header giving each tensor's dtype,
// shape and byte range, then the bytes. What `switchyard ckpt export`
// writes and `checkpoint.init_from` reads. F32 and BF16 only.
#ifndef SWITCHYARD_STORAGE_SAFETENSORS_H_
#define SWITCHYARD_STORAGE_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"

namespace switchyard::storage {

struct NamedArray {
  std::string name;
  Tensor tensor;
};

Status WriteSafetensors(const std::string& path,
                        const std::vector<NamedArray>& tensors,
                        const std::map<std::string, std::string>& metadata);

// "(256, 128)".
std::string FormatShape(const std::vector<int64_t>& shape);

// A directory of safetensors files with a model.safetensors.index.json
// (weight_map: tensor -> file), or a single .safetensors file: regular
// files only. Open checks every header (dtypes F32/BF16, shapes, byte
// ranges in bounds, in order, without overlap or gap, names unique across
// the files) and fails naming the file and the tensor. Reads tensors on
// demand. Thread-compatible.
class SafetensorsReader {
 public:
  static StatusOr<SafetensorsReader> Open(const std::string& path);

  bool Has(const std::string& name) const { return where_.count(name) > 0; }
  std::vector<std::string> Names() const;
  // The tensor's shape, or NOT_FOUND.
  StatusOr<std::vector<int64_t>> Shape(const std::string& name) const;
  // OK when tensor `name` has exactly the shape `expected`; else
  // FAILED_PRECONDITION naming the file, the tensor, the shape found and the
  // one expected, with Switchyard's orientation (y = x @ W, W stored
  // (in_features, out_features)). NOT_FOUND when there is no such tensor.
  Status CheckShape(const std::string& name,
                    const std::vector<int64_t>& expected) const;
  // The tensor as fp32 (bf16 widened).
  StatusOr<Tensor> Read(const std::string& name) const;
  // Read after CheckShape.
  StatusOr<Tensor> Read(const std::string& name,
                        const std::vector<int64_t>& expected) const;

 private:
  struct Entry {
    std::string file;
    DType dtype = DType::kF32;
    std::vector<int64_t> shape;
    uint64_t begin = 0, end = 0;  // Absolute offsets in the file.
  };
  static Status AddFile(const std::string& path,
                        std::map<std::string, Entry>* where);
  std::map<std::string, Entry> where_;
};

}  // namespace switchyard::storage

#endif  // SWITCHYARD_STORAGE_SAFETENSORS_H_
