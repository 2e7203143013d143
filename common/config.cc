#include "common/config.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/reflection.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>

#include "common/net_address.h"

namespace switchyard {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

std::string Location(const std::string& source, const YAML::Node& node) {
  return source + ":" + std::to_string(node.Mark().line + 1);
}

Status FieldError(const std::string& where, const std::string& path,
                  const std::string& what) {
  return InvalidArgumentError(where + ": " + path + ": " + what);
}

// Sets scalar field `field` of `msg` from its YAML text.
Status SetScalar(Message* msg, const FieldDescriptor* field,
                 const std::string& text, const std::string& where,
                 const std::string& path) {
  const Reflection* refl = msg->GetReflection();
  auto bad = [&](const std::string& type) {
    return FieldError(where, path, "value '" + text + "' is not " + type);
  };
  errno = 0;
  char* end = nullptr;
  switch (field->cpp_type()) {
    case FieldDescriptor::CPPTYPE_INT32:
    case FieldDescriptor::CPPTYPE_INT64: {
      const long long v = std::strtoll(text.c_str(), &end, 10);
      if (text.empty() || *end != '\0' || errno == ERANGE) {
        return bad("an integer");
      }
      if (field->cpp_type() == FieldDescriptor::CPPTYPE_INT32) {
        if (v < std::numeric_limits<int32_t>::min() ||
            v > std::numeric_limits<int32_t>::max()) {
          return bad("a 32-bit integer");
        }
        refl->SetInt32(msg, field, static_cast<int32_t>(v));
      } else {
        refl->SetInt64(msg, field, v);
      }
      return OkStatus();
    }
    case FieldDescriptor::CPPTYPE_UINT32:
    case FieldDescriptor::CPPTYPE_UINT64: {
      if (text.empty() || text[0] == '-') return bad("a non-negative integer");
      const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
      if (*end != '\0' || errno == ERANGE) return bad("a non-negative integer");
      if (field->cpp_type() == FieldDescriptor::CPPTYPE_UINT32) {
        if (v > std::numeric_limits<uint32_t>::max()) {
          return bad("a 32-bit unsigned integer");
        }
        refl->SetUInt32(msg, field, static_cast<uint32_t>(v));
      } else {
        refl->SetUInt64(msg, field, v);
      }
      return OkStatus();
    }
    case FieldDescriptor::CPPTYPE_DOUBLE:
    case FieldDescriptor::CPPTYPE_FLOAT: {
      const double v = std::strtod(text.c_str(), &end);
      if (text.empty() || *end != '\0' || errno == ERANGE ||
          !std::isfinite(v)) {
        return bad("a finite number");
      }
      if (field->cpp_type() == FieldDescriptor::CPPTYPE_DOUBLE) {
        refl->SetDouble(msg, field, v);
      } else {
        refl->SetFloat(msg, field, static_cast<float>(v));
      }
      return OkStatus();
    }
    case FieldDescriptor::CPPTYPE_BOOL:
      if (text == "true") {
        refl->SetBool(msg, field, true);
      } else if (text == "false") {
        refl->SetBool(msg, field, false);
      } else {
        return bad("a boolean (true or false)");
      }
      return OkStatus();
    case FieldDescriptor::CPPTYPE_STRING:
      refl->SetString(msg, field, text);
      return OkStatus();
    default:
      return FieldError(where, path, "field type is not supported in config");
  }
}

// Sets `key` of the map<string, string> field `field` of `msg` to `value`
// (replacing an earlier value).
void SetMapEntry(Message* msg, const FieldDescriptor* field,
                 const std::string& key, const std::string& value) {
  const google::protobuf::Reflection* refl = msg->GetReflection();
  const FieldDescriptor* key_field = field->message_type()->map_key();
  const FieldDescriptor* value_field = field->message_type()->map_value();
  for (int i = 0; i < refl->FieldSize(*msg, field); ++i) {
    Message* entry = refl->MutableRepeatedMessage(msg, field, i);
    if (entry->GetReflection()->GetString(*entry, key_field) == key) {
      entry->GetReflection()->SetString(entry, value_field, value);
      return;
    }
  }
  Message* entry = refl->AddMessage(msg, field);
  entry->GetReflection()->SetString(entry, key_field, key);
  entry->GetReflection()->SetString(entry, value_field, value);
}

Status MergeNode(const YAML::Node& node, Message* msg,
                 const std::string& prefix, const std::string& source,
                 std::map<std::string, std::string>* origins) {
  const std::string here = Location(source, node);
  if (!node.IsMap()) {
    return FieldError(here, prefix.empty() ? "<top level>" : prefix,
                      "expected a mapping of field names to values");
  }
  const Descriptor* desc = msg->GetDescriptor();
  for (const auto& kv : node) {
    const std::string key = kv.first.as<std::string>();
    const std::string path = prefix.empty() ? key : prefix + "." + key;
    const std::string where = Location(source, kv.first);
    const FieldDescriptor* field = desc->FindFieldByName(key);
    if (field == nullptr) {
      std::string known;
      for (int i = 0; i < desc->field_count(); ++i) {
        known += (i ? ", " : "") + desc->field(i)->name();
      }
      return FieldError(where, path,
                        "unknown field (known here: " + known + ")");
    }
    const YAML::Node& value = kv.second;
    if (field->is_map()) {  // map<string, string>: a mapping of scalars.
      if (!value.IsMap()) {
        return FieldError(where, path, "expected a mapping of names to values");
      }
      for (const auto& entry : value) {
        const std::string name = entry.first.as<std::string>();
        const std::string entry_where = Location(source, entry.first);
        if (!entry.second.IsScalar()) {
          return FieldError(entry_where, path + "." + name,
                            "expected a single value");
        }
        SetMapEntry(msg, field, name, entry.second.Scalar());
        (*origins)[path + "." + name] = entry_where;
      }
      continue;
    }
    if (field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      RETURN_IF_ERROR(
          MergeNode(value, msg->GetReflection()->MutableMessage(msg, field),
                    path, source, origins));
      continue;
    }
    if (value.IsNull()) return FieldError(where, path, "has no value");
    if (!value.IsScalar()) {
      return FieldError(where, path,
                        "expected a single value, not a " +
                            std::string(value.IsMap() ? "mapping" : "list"));
    }
    RETURN_IF_ERROR(SetScalar(msg, field, value.Scalar(), where, path));
    (*origins)[path] = where;
  }
  return OkStatus();
}

Status ApplyOverride(const std::string& assignment, SwitchyardConfig* config,
                     std::map<std::string, std::string>* origins) {
  const std::string where = "--set " + assignment;
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    return InvalidArgumentError(where + ": expected section.field=value");
  }
  const std::string path = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);
  Message* msg = config;
  const FieldDescriptor* field = nullptr;
  size_t start = 0;
  while (true) {
    const size_t dot = path.find('.', start);
    const std::string name = path.substr(start, dot - start);
    field = msg->GetDescriptor()->FindFieldByName(name);
    if (field == nullptr) {
      return FieldError(where, path, "unknown field '" + name + "'");
    }
    if (field->is_map()) {  // section.map.NAME=value
      if (dot == std::string::npos || dot + 1 == path.size()) {
        return FieldError(where, path,
                          "is a mapping: set " + path + ".NAME=value");
      }
      const std::string key = path.substr(dot + 1);
      SetMapEntry(msg, field, key, value);
      (*origins)[path] = where;
      return OkStatus();
    }
    if (dot == std::string::npos) break;
    if (field->cpp_type() != FieldDescriptor::CPPTYPE_MESSAGE) {
      return FieldError(where, path, "'" + name + "' is not a section");
    }
    msg = msg->GetReflection()->MutableMessage(msg, field);
    start = dot + 1;
  }
  if (field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
    return FieldError(where, path, "is a section, not a field");
  }
  RETURN_IF_ERROR(SetScalar(msg, field, value, where, path));
  (*origins)[path] = where;
  return OkStatus();
}

void CollectPaths(const Descriptor* desc, const std::string& prefix,
                  std::vector<std::string>* out) {
  for (int i = 0; i < desc->field_count(); ++i) {
    const FieldDescriptor* f = desc->field(i);
    const std::string path =
        prefix.empty() ? f->name() : prefix + "." + f->name();
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE && !f->is_map()) {
      CollectPaths(f->message_type(), path, out);
    } else {
      out->push_back(path);
    }
  }
}

// Accumulates rule checks; the first failure wins.
class Validator {
 public:
  explicit Validator(const std::map<std::string, std::string>& origins)
      : origins_(origins) {}

  // Fails with "<where>: <path> (<value>) <rule>" unless `ok`.
  template <typename T>
  void Require(bool ok, const std::string& path, const T& value,
               const std::string& rule) {
    if (!status_.ok() || ok) return;
    std::ostringstream msg;
    msg << Where(path) << ": " << path << " (" << value << ") " << rule;
    status_ = InvalidArgumentError(msg.str());
  }
  void OneOf(const std::string& path, const std::string& value,
             const std::vector<std::string>& allowed) {
    bool found = false;
    std::string list;
    for (const auto& a : allowed) {
      found = found || a == value;
      list += (list.empty() ? "" : ", ") + a;
    }
    Require(found, path, "'" + value + "'", "must be one of: " + list);
  }
  Status status() const { return status_; }

 private:
  std::string Where(const std::string& path) const {
    auto it = origins_.find(path);
    return it == origins_.end() ? "default" : it->second;
  }

  const std::map<std::string, std::string>& origins_;
  Status status_;
};

}  // namespace

StatusOr<LoadedConfig> ParseConfig(std::string_view yaml_text,
                                   const std::string& source_name,
                                   const std::vector<std::string>& overrides) {
  LoadedConfig loaded;
  try {
    YAML::Node root = YAML::Load(std::string(yaml_text));
    if (root.IsDefined() && !root.IsNull()) {
      RETURN_IF_ERROR(
          MergeNode(root, &loaded.config, "", source_name, &loaded.origins));
    }
  } catch (const YAML::Exception& e) {
    return InvalidArgumentError(source_name + ":" +
                                std::to_string(e.mark.line + 1) +
                                ": not valid YAML: " + e.msg);
  }
  for (const std::string& o : overrides) {
    RETURN_IF_ERROR(ApplyOverride(o, &loaded.config, &loaded.origins));
  }
  RETURN_IF_ERROR(ValidateConfig(loaded.config, loaded.origins));
  return loaded;
}

StatusOr<LoadedConfig> LoadConfig(const std::string& path,
                                  const std::vector<std::string>& overrides) {
  if (path.empty()) return ParseConfig("", "<defaults>", overrides);
  std::ifstream in(path);
  if (!in) {
    return NotFoundError("cannot read config file '" + path +
                         "': " + std::strerror(errno));
  }
  std::stringstream text;
  text << in.rdbuf();
  return ParseConfig(text.str(), path, overrides);
}

Status ValidateConfig(const SwitchyardConfig& config,
                      const std::map<std::string, std::string>& origins) {
  Validator v(origins);
  const auto& c = config.cluster();
  auto addr = ParseHostPort(c.coordinator_address());
  v.Require(addr.ok(), "cluster.coordinator_address", c.coordinator_address(),
            "must be host:port with a port in 0..65535");
  v.Require(c.workers() >= 1, "cluster.workers", c.workers(), "must be >= 1");
  v.Require(c.trainers() >= 1, "cluster.trainers", c.trainers(),
            "must be >= 1");
  v.Require(c.lease_ms() >= 100, "cluster.lease_ms", c.lease_ms(),
            "must be >= 100");
  v.Require(c.heartbeat_ms() >= 10, "cluster.heartbeat_ms", c.heartbeat_ms(),
            "must be >= 10");
  v.Require(c.heartbeat_ms() * 2 <= c.lease_ms(), "cluster.heartbeat_ms",
            c.heartbeat_ms(),
            "must be at most half of cluster.lease_ms (" +
                std::to_string(c.lease_ms()) + ")");
  v.Require(!c.state_dir().empty(), "cluster.state_dir", "''",
            "must not be empty");
  v.Require(c.max_frame_bytes() >= 4096 && c.max_frame_bytes() <= (1 << 30),
            "cluster.max_frame_bytes", c.max_frame_bytes(),
            "must be in [4096, 1073741824]");
  v.Require(c.call_timeout_ms() >= 1, "cluster.call_timeout_ms",
            c.call_timeout_ms(), "must be >= 1");
  v.Require(c.worker_capacity_bytes() >= 1, "cluster.worker_capacity_bytes",
            c.worker_capacity_bytes(), "must be >= 1");

  const auto& m = config.model();
  v.Require(m.num_layers() >= 1, "model.num_layers", m.num_layers(),
            "must be >= 1");
  v.Require(m.d_model() >= 1, "model.d_model", m.d_model(), "must be >= 1");
  v.Require(m.d_ff() >= 1, "model.d_ff", m.d_ff(), "must be >= 1");
  v.Require(m.num_heads() >= 1, "model.num_heads", m.num_heads(),
            "must be >= 1");
  v.Require(m.num_heads() >= 1 && m.d_model() % m.num_heads() == 0,
            "model.d_model", m.d_model(),
            "must be divisible by model.num_heads (" +
                std::to_string(m.num_heads()) + ")");
  v.Require(m.vocab_size() >= 2, "model.vocab_size", m.vocab_size(),
            "must be >= 2");
  v.Require(m.seq_len() >= 1, "model.seq_len", m.seq_len(), "must be >= 1");
  v.Require(m.moe_every() >= 1, "model.moe_every", m.moe_every(),
            "must be >= 1");
  v.Require(m.moe_every() <= m.num_layers(), "model.moe_every", m.moe_every(),
            "must be <= model.num_layers (" + std::to_string(m.num_layers()) +
                ") so that the model has an MoE layer");
  v.Require(m.num_experts() >= 1, "model.num_experts", m.num_experts(),
            "must be >= 1");
  v.Require(m.top_k() >= 1 && m.top_k() <= m.num_experts(), "model.top_k",
            m.top_k(),
            "must be in [1, model.num_experts (" +
                std::to_string(m.num_experts()) + ")]");
  v.Require(m.shards_per_expert() >= 1, "model.shards_per_expert",
            m.shards_per_expert(), "must be >= 1");
  v.Require(m.shards_per_expert() >= 1 && m.d_ff() % m.shards_per_expert() == 0,
            "model.d_ff", m.d_ff(),
            "must be divisible by model.shards_per_expert (" +
                std::to_string(m.shards_per_expert()) + ")");
  v.OneOf("model.activation", m.activation(), {"gelu", "relu", "swiglu"});
  v.Require(m.capacity_factor() >= 0, "model.capacity_factor",
            m.capacity_factor(), "must be >= 0 (0 means dropless)");
  v.Require(m.aux_loss_alpha() >= 0, "model.aux_loss_alpha", m.aux_loss_alpha(),
            "must be >= 0");
  v.Require(m.router_z_loss() >= 0, "model.router_z_loss", m.router_z_loss(),
            "must be >= 0");
  v.Require(m.router_jitter() >= 0 && m.router_jitter() < 1,
            "model.router_jitter", m.router_jitter(), "must be in [0, 1)");
  v.Require(m.expert_dropout() >= 0 && m.expert_dropout() < 1,
            "model.expert_dropout", m.expert_dropout(), "must be in [0, 1)");
  v.Require(m.init_scale() > 0, "model.init_scale", m.init_scale(),
            "must be > 0");
  v.OneOf("model.norm", m.norm(), {"rmsnorm", "layernorm"});
  v.OneOf("model.positions", m.positions(), {"learned", "rotary"});
  v.Require(m.dense_shards() >= 1, "model.dense_shards", m.dense_shards(),
            "must be >= 1");

  const auto& t = config.training();
  v.Require(t.steps() >= 0, "training.steps", t.steps(), "must be >= 0");
  v.Require(t.batch_size() >= 1, "training.batch_size", t.batch_size(),
            "must be >= 1");
  v.Require(t.micro_batches() >= 1, "training.micro_batches", t.micro_batches(),
            "must be >= 1");
  v.Require(t.micro_batches() >= 1 && t.batch_size() % t.micro_batches() == 0,
            "training.batch_size", t.batch_size(),
            "must be divisible by training.micro_batches (" +
                std::to_string(t.micro_batches()) + ")");
  v.OneOf("training.optimizer", t.optimizer(), {"adamw", "adafactor"});
  v.Require(t.learning_rate() > 0, "training.learning_rate", t.learning_rate(),
            "must be > 0");
  v.OneOf("training.lr_schedule", t.lr_schedule(),
          {"constant", "cosine", "inverse_sqrt"});
  v.Require(t.warmup_steps() >= 0, "training.warmup_steps", t.warmup_steps(),
            "must be >= 0");
  v.Require(t.weight_decay() >= 0, "training.weight_decay", t.weight_decay(),
            "must be >= 0");
  v.Require(t.beta1() >= 0 && t.beta1() < 1, "training.beta1", t.beta1(),
            "must be in [0, 1)");
  v.Require(t.beta2() >= 0 && t.beta2() < 1, "training.beta2", t.beta2(),
            "must be in [0, 1)");
  v.Require(t.eps() > 0, "training.eps", t.eps(), "must be > 0");
  v.OneOf("training.compute_dtype", t.compute_dtype(), {"fp32", "bf16"});
  v.OneOf("training.wire_dtype", t.wire_dtype(), {"fp32", "bf16"});
  v.Require(t.log_every() >= 1, "training.log_every", t.log_every(),
            "must be >= 1");
  v.Require(t.eval_every() >= 0, "training.eval_every", t.eval_every(),
            "must be >= 0 (0 disables validation)");
  v.Require(t.threads() >= 0, "training.threads", t.threads(),
            "must be >= 0 (0 means one per core)");
  v.Require(t.validation_fraction() > 0 && t.validation_fraction() <= 0.5,
            "training.validation_fraction", t.validation_fraction(),
            "must be in (0, 0.5]");
  v.Require(t.stop_at_step() >= 0 && t.stop_at_step() <= t.steps(),
            "training.stop_at_step", t.stop_at_step(),
            "must be in [0, training.steps]");

  const auto& k = config.checkpoint();
  v.Require(k.every() >= 0, "checkpoint.every", k.every(),
            "must be >= 0 (0 disables checkpoints)");
  v.Require(k.keep_last() >= 1, "checkpoint.keep_last", k.keep_last(),
            "must be >= 1");
  v.Require(k.replicas() >= 0, "checkpoint.replicas", k.replicas(),
            "must be >= 0");
  v.Require(k.commit_timeout_ms() >= 1, "checkpoint.commit_timeout_ms",
            k.commit_timeout_ms(), "must be >= 1");
  v.Require(k.replicas() < c.workers(), "checkpoint.replicas", k.replicas(),
            "must be < cluster.workers (" + std::to_string(c.workers()) +
                "): a replica lives on another worker");

  const auto& x = config.transport();
  v.OneOf("transport.backend", x.backend(), {"ucx", "nccl"});
  v.Require(!x.data_host().empty(), "transport.data_host", "''",
            "must not be empty");
  v.Require(x.request_timeout_ms() >= 1, "transport.request_timeout_ms",
            x.request_timeout_ms(), "must be >= 1");
  v.Require(x.max_inflight_bytes() >= 1, "transport.max_inflight_bytes",
            x.max_inflight_bytes(), "must be >= 1");
  v.Require(x.busy_poll_us() >= 0 && x.busy_poll_us() <= 1000000,
            "transport.busy_poll_us", x.busy_poll_us(),
            "must be in [0, 1000000]");
  v.Require(x.ucx_tls().empty() ||
                x.ucx_tls().find("tcp") != std::string::npos ||
                x.ucx_tls().find("all") != std::string::npos,
            "transport.ucx_tls", x.ucx_tls(),
            "must include tcp: UCX 1.13 sets up connections over TCP");
  for (const auto& [name, value] : x.ucx()) {
    const std::string path = "transport.ucx." + name;
    const bool well_formed =
        name.size() > 4 && name.compare(0, 4, "UCX_") == 0 &&
        std::all_of(name.begin() + 4, name.end(), [](char ch) {
          return (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                 ch == '_';
        });
    v.Require(well_formed, path, "'" + value + "'",
              "is not a UCX setting: names are UCX_ and capitals, as "
              "`ucx_info -c` lists them");
    v.Require(name != "UCX_TLS", path, "'" + value + "'",
              "is set by transport.ucx_tls");
    v.Require(!value.empty() && value.find('\n') == std::string::npos, path,
              "'" + value + "'", "must be one non-empty line");
  }
  return v.status();
}

std::vector<std::string> AllConfigFieldPaths() {
  std::vector<std::string> out;
  CollectPaths(SwitchyardConfig::descriptor(), "", &out);
  return out;
}

}  // namespace switchyard
