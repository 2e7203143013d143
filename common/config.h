// Loading and validating the run configuration (proto/config.proto).
//
// A YAML file maps onto SwitchyardConfig; `--set section.field=value`
// overrides apply on top. Every error names the source (file:line or the
// override), the field path, the value and the rule it breaks. Unset fields
// keep the defaults declared in the schema.
#ifndef SWITCHYARD_COMMON_CONFIG_H_
#define SWITCHYARD_COMMON_CONFIG_H_

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "config.pb.h"

namespace switchyard {

using config::SwitchyardConfig;

struct LoadedConfig {
  SwitchyardConfig config;
  // Field path ("model.num_experts") -> where its value came from
  // ("tiny.yaml:7" or "--set model.num_experts=16").
  std::map<std::string, std::string> origins;
};

// Parses `yaml_text` (named `source_name` in errors), applies `overrides`
// ("path=value" each), and validates the result.
StatusOr<LoadedConfig> ParseConfig(std::string_view yaml_text,
                                   const std::string& source_name,
                                   const std::vector<std::string>& overrides);

// Reads the file at `path`, then as ParseConfig. An empty path means "all
// defaults plus overrides".
StatusOr<LoadedConfig> LoadConfig(const std::string& path,
                                  const std::vector<std::string>& overrides);

// Checks every rule of docs/configuration.md. `origins` locates the fields in
// error messages; fields absent from it are reported as defaults.
Status ValidateConfig(const SwitchyardConfig& config,
                      const std::map<std::string, std::string>& origins);

// Every leaf field path of the schema, e.g. "cluster.lease_ms", in schema
// order. Used by docs tests and --help.
std::vector<std::string> AllConfigFieldPaths();

// Where this run stops: training.stop_at_step when set, else
// training.steps.
inline int64_t RunEndStep(const config::TrainingConfig& training) {
  return training.stop_at_step() > 0 ? training.stop_at_step()
                                     : training.steps();
}

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_CONFIG_H_
