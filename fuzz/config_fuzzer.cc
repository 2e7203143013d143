// Fuzzes the configuration loader (common/config.h): ParseConfig on
// arbitrary YAML text with arbitrary `--set` overrides, then what every
// process derives from a configuration it accepted (common/model_shape.h:
// the dense layout, the expert tensors, the placement units).
//
// Input: NUL-separated parts: the YAML text, then up to 16 overrides
// ("section.field=value" each, as the command line gives them). Checks:
// an error names its source; an accepted configuration validates again and
// its derived sizes are consistent.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/config.h"
#include "common/model_shape.h"
#include "fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  switchyard::fuzz::QuietLogging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace switchyard;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t yaml_end = std::min(input.find('\0'), input.size());
  const std::string_view yaml = input.substr(0, yaml_end);
  std::vector<std::string> overrides;
  for (size_t at = yaml_end; at < input.size() && overrides.size() < 16;) {
    const size_t end = std::min(input.find('\0', at + 1), input.size());
    overrides.emplace_back(input.substr(at + 1, end - at - 1));
    at = end;
  }
  auto loaded = ParseConfig(yaml, "fuzz.yaml", overrides);
  if (!loaded.ok()) {
    const std::string& message = loaded.status().message();
    FUZZ_CHECK(message.rfind("fuzz.yaml:", 0) == 0 ||
               message.rfind("--set ", 0) == 0 ||
               message.rfind("default:", 0) == 0);
    return 0;
  }
  const SwitchyardConfig& config = loaded->config;
  FUZZ_CHECK(ValidateConfig(config, loaded->origins).ok());
  const config::ModelConfig& model = config.model();
  const auto layout = DenseLayout(model);
  int64_t dense = 0;
  for (const DenseTensor& t : layout) {
    FUZZ_CHECK(t.offset == dense && t.rows >= 1 && t.cols >= 1);
    dense += t.numel();
  }
  FUZZ_CHECK(dense == DenseParams(model));
  for (const auto& [name, shape] : FfnTensorShapes(model)) {
    for (int64_t d : shape) FUZZ_CHECK(d >= 1);
  }
  const auto shards = ModelShards(config);
  FUZZ_CHECK(shards.size() == static_cast<size_t>(NumMoeLayers(model)) *
                                      model.num_experts() *
                                      model.shards_per_expert() +
                                  model.dense_shards());
  int64_t dense_in_shards = 0;
  for (const ShardFootprint& s : shards) {
    FUZZ_CHECK(s.num_params >= 0 && s.bytes >= 0);
    if (!s.id.is_expert()) dense_in_shards += s.num_params;
  }
  FUZZ_CHECK(dense_in_shards == dense);
  return 0;
}
