#include "common/config.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/reflection.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>

#include "common/files.h"
#include "common/model_shape.h"
#include "common/net_address.h"

namespace switchyard {
namespace {

// Switchyard's limits (docs/configuration.md, "Limits"): far above any
// model it is meant for, low enough that every size the code derives from
// them fits its integer types, so that a typo is refused here instead of
// ending a process later in an overflow or a failed allocation.
constexpr int64_t kMaxWorkers = 4096;
constexpr int64_t kMaxTrainers = 4096;
constexpr int64_t kMaxWorkerCapacityBytes = int64_t{1} << 50;  // 1 PiB
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxDModel = 65536;
constexpr int64_t kMaxDFf = 1 << 20;
constexpr int64_t kMaxHeads = 1024;
constexpr int64_t kMaxVocab = 1 << 22;
constexpr int64_t kMaxSeqLen = 1 << 20;
constexpr int64_t kMaxExperts = 8192;
constexpr int64_t kMaxShardsPerExpert = 256;
constexpr int64_t kMaxDenseShards = 65536;
constexpr int64_t kMaxSteps = 1000000000000;
constexpr int64_t kMaxBatchSize = 1 << 20;
constexpr int64_t kMaxThreads = 1024;
constexpr int64_t kMaxKeepLast = 1000;
constexpr int64_t kMaxInflightBytes = int64_t{1} << 40;  // 1 TiB
// Limits on products of fields.
constexpr int64_t kMaxShards = 1 << 20;                 // Placement units.
constexpr int64_t kMaxTensorBytes = int64_t{1} << 34;   // 16 GiB
constexpr int64_t kMaxMicroBatchTokens = 1 << 24;       // And token x top_k.
constexpr int64_t kMaxTrainerBytes = int64_t{1} << 38;  // 256 GiB
constexpr uint64_t kMaxConfigFileBytes = 1 << 20;

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

// YAML keeps only the last of two equal keys of a mapping; a run whose file
// says two things must not silently use one, so both lines are named.
Status RefuseDuplicate(std::map<std::string, std::string>* seen,
                       const std::string& key, const std::string& where,
                       const std::string& path) {
  auto [it, inserted] = seen->emplace(key, where);
  if (inserted) return OkStatus();
  return FieldError(
      where, path,
      "is given twice (also at " + it->second + "); remove one of the two");
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
  std::map<std::string, std::string> seen;  // Key -> where it was first.
  for (const auto& kv : node) {
    const std::string key = kv.first.as<std::string>();
    const std::string path = prefix.empty() ? key : prefix + "." + key;
    const std::string where = Location(source, kv.first);
    RETURN_IF_ERROR(RefuseDuplicate(&seen, key, where, path));
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
      std::map<std::string, std::string> seen_names;
      for (const auto& entry : value) {
        const std::string name = entry.first.as<std::string>();
        const std::string entry_where = Location(source, entry.first);
        RETURN_IF_ERROR(
            RefuseDuplicate(&seen_names, name, entry_where, path + "." + name));
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
  // Fails with "<where>: <path> (<value>) must be <= <limit>" when the
  // value passes Switchyard's limit for the field (docs/configuration.md,
  // "Limits").
  void AtMost(const std::string& path, int64_t value, int64_t limit) {
    Require(value <= limit, path, value,
            "must be <= " + std::to_string(limit) +
                " (Switchyard's limit for this field)");
  }
  // Fails unless `amount` (of `unit`) is at most `limit`: "<where>: <path>
  // (<value>) makes <what> <amount>, more than Switchyard's limit of
  // <limit>". The error is located at the first of `fields` (path, value)
  // that the configuration sets, else at the first of them.
  void AmountAtMost(
      int64_t amount, int64_t limit, const std::string& unit,
      const std::string& what,
      const std::vector<std::pair<std::string, int64_t>>& fields) {
    if (!status_.ok() || amount <= limit) return;
    auto named = fields.front();
    for (const auto& f : fields) {
      if (origins_.count(f.first)) {
        named = f;
        break;
      }
    }
    Require(false, named.first, named.second,
            "makes " + what + " " + Amount(amount, unit) +
                ", more than Switchyard's limit of " + Amount(limit, unit));
  }
  // AmountAtMost of scale x the product of `factors`, which the message
  // lists ("model.d_model 64 x model.vocab_size 256 x 4").
  void ProductAtMost(
      const std::vector<std::pair<std::string, int64_t>>& factors,
      int64_t scale, const std::string& what, int64_t limit,
      const std::string& unit) {
    int64_t product = scale;
    std::string terms;
    for (const auto& [path, value] : factors) {
      product = SaturatingMul(product, value);
      terms +=
          (terms.empty() ? "" : " x ") + path + " " + std::to_string(value);
    }
    if (scale != 1) terms += " x " + std::to_string(scale);
    AmountAtMost(product, limit, unit, what + " (" + terms + ")", factors);
  }
  Status status() const { return status_; }

  static int64_t SaturatingMul(int64_t a, int64_t b) {
    int64_t out;
    if (__builtin_mul_overflow(a, b, &out)) {
      return std::numeric_limits<int64_t>::max();
    }
    return out;
  }

 private:
  static std::string Amount(int64_t n, const std::string& unit) {
    std::string out =
        (n == std::numeric_limits<int64_t>::max() ? "over " : "") +
        std::to_string(n) + " " + unit;
    if (unit == "bytes" && n >= (int64_t{1} << 30)) {
      out += " (" + std::to_string(n >> 30) + " GiB)";
    }
    return out;
  }
  std::string Where(const std::string& path) const {
    auto it = origins_.find(path);
    return it == origins_.end() ? "default" : it->second;
  }

  const std::map<std::string, std::string>& origins_;
  Status status_;
};

// Products of fields, each within its own limit: the shards to place, the
// largest tensors of the model and of a micro-batch, and a trainer's memory.
// Every product here fits int64 because every factor is within its limit
// (and the trainer's sum because its terms are checked first).
void ValidateSizes(const SwitchyardConfig& config, Validator* v) {
  const auto& m = config.model();
  const auto& t = config.training();
  const int64_t d = m.d_model(), ff = m.d_ff(), vocab = m.vocab_size();
  const int64_t seq = m.seq_len(), heads = m.num_heads();
  const int64_t gates = FfnGates(m);
  const int64_t moe_layers = NumMoeLayers(m);
  const std::string kBytes = "bytes";
  v->ProductAtMost({{"model.num_experts", m.num_experts()},
                    {"model.shards_per_expert", m.shards_per_expert()},
                    {"MoE layers", moe_layers}},
                   1, "the expert shards", kMaxShards, "shards");
  v->ProductAtMost({{"model.d_ff", ff}, {"model.d_model", d}, {"gates", gates}},
                   4, "a dense FFN's or an expert's w1", kMaxTensorBytes,
                   kBytes);
  v->ProductAtMost({{"model.vocab_size", vocab}, {"model.d_model", d}}, 4,
                   "tok_embed and lm_head each", kMaxTensorBytes, kBytes);
  const int64_t dense = DenseParams(m);
  const int64_t largest_dense_shard =
      dense - dense / m.dense_shards() * (m.dense_shards() - 1);
  v->AmountAtMost(4 * largest_dense_shard, kMaxTensorBytes, kBytes,
                  "the largest dense shard (" + std::to_string(dense) +
                      " dense parameters in " +
                      std::to_string(m.dense_shards()) + " shards, fp32)",
                  {{"model.dense_shards", m.dense_shards()},
                   {"model.d_model", d},
                   {"model.num_layers", m.num_layers()}});
  // A trainer's micro-batch: b sequences of seq_len tokens.
  const int64_t b = t.batch_size() / t.micro_batches();
  const std::string micro_batch =
      std::to_string(b) + " sequences (training.batch_size " +
      std::to_string(t.batch_size()) + " / training.micro_batches " +
      std::to_string(t.micro_batches()) + ") x model.seq_len " +
      std::to_string(seq);
  const std::vector<std::pair<std::string, int64_t>> batch_fields = {
      {"training.batch_size", t.batch_size()},
      {"model.seq_len", seq},
      {"training.micro_batches", t.micro_batches()}};
  v->AmountAtMost(b * seq, kMaxMicroBatchTokens, "tokens",
                  "one micro-batch (" + micro_batch + ")", batch_fields);
  v->AmountAtMost(b * seq * m.top_k(), kMaxMicroBatchTokens, "assignments",
                  "one micro-batch's expert assignments (" + micro_batch +
                      " x model.top_k " + std::to_string(m.top_k()) + ")",
                  {{"model.top_k", m.top_k()},
                   {"training.batch_size", t.batch_size()},
                   {"model.seq_len", seq}});
  v->ProductAtMost({{"model.seq_len", seq},
                    {"model.seq_len", seq},
                    {"model.num_heads", heads}},
                   4, "one sequence's attention probabilities", kMaxTensorBytes,
                   kBytes);
  std::vector<std::pair<std::string, int64_t>> logits_fields = batch_fields;
  logits_fields.insert(logits_fields.begin() + 2, {"model.vocab_size", vocab});
  v->AmountAtMost(Validator::SaturatingMul(4 * b * seq, vocab), kMaxTensorBytes,
                  kBytes,
                  "one micro-batch's logits (" + micro_batch +
                      " x model.vocab_size " + std::to_string(vocab) + " x 4)",
                  logits_fields);
  if (!v->status().ok()) return;
  // A worker holds a MoE layer's forward (or backward) of one micro-batch
  // from every trainer at once: it computes a shard once every rank's rows
  // are in. At most trainers x the micro-batch's assignments x shards per
  // expert rows of d_model values in the wire dtype, all counted against
  // transport.max_inflight_bytes until answered; a budget below that could
  // leave a shard waiting for a request the budget keeps out.
  if (moe_layers > 0) {
    const int64_t wire_bytes = t.wire_dtype() == "bf16" ? 2 : 4;
    const int64_t held = Validator::SaturatingMul(
        Validator::SaturatingMul(
            Validator::SaturatingMul(config.cluster().trainers(),
                                     b * seq * m.top_k()),
            m.shards_per_expert()),
        d * wire_bytes);
    v->Require(held <= config.transport().max_inflight_bytes(),
               "transport.max_inflight_bytes",
               config.transport().max_inflight_bytes(),
               "must be at least " + std::to_string(held) +
                   ": what a worker may hold of one MoE layer's micro-batch "
                   "(cluster.trainers " +
                   std::to_string(config.cluster().trainers()) + " x " +
                   micro_batch + " x model.top_k " + std::to_string(m.top_k()) +
                   " x model.shards_per_expert " +
                   std::to_string(m.shards_per_expert()) + " x model.d_model " +
                   std::to_string(d) + " x " + std::to_string(wire_bytes) +
                   " bytes of training.wire_dtype); raise it or "
                   "training.micro_batches");
  }
  // A trainer holds the dense parameters and their gradients, and for the
  // backward pass, per layer, x, Norm1(x), h, Norm2(h), q, k, v and the
  // attention context (N, d) each and the attention probabilities (b,
  // heads, seq_len, seq_len); a dense FFN's hidden values (N, gates * d_ff)
  // twice; the logits and their gradient (N, vocab): at least this many
  // fp32 values.
  const int64_t tokens = b * seq;
  const int64_t dense_layers = m.num_layers() - moe_layers;
  const int64_t values =
      2 * dense + m.num_layers() * (8 * tokens * d + b * heads * seq * seq) +
      dense_layers * 2 * tokens * gates * ff + 2 * tokens * vocab;
  v->AmountAtMost(Validator::SaturatingMul(4, values), kMaxTrainerBytes, kBytes,
                  "a trainer's memory (dense parameters and their gradients, "
                  "one micro-batch's activations) at least",
                  {{"training.batch_size", t.batch_size()},
                   {"model.seq_len", seq},
                   {"model.num_layers", m.num_layers()},
                   {"model.d_model", d},
                   {"model.d_ff", ff},
                   {"model.vocab_size", vocab}});
}

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
  // Regular files only: /dev/zero or a FIFO would never end.
  auto text = ReadRegularFile(path, kMaxConfigFileBytes);
  if (!text.ok()) return text.status().WithContext("config file");
  return ParseConfig(*text, path, overrides);
}

Status ValidateConfig(const SwitchyardConfig& config,
                      const std::map<std::string, std::string>& origins) {
  Validator v(origins);
  const auto& c = config.cluster();
  auto addr = ParseHostPort(c.coordinator_address());
  v.Require(addr.ok(), "cluster.coordinator_address", c.coordinator_address(),
            "must be host:port with a port in 0..65535");
  v.Require(c.workers() >= 1, "cluster.workers", c.workers(), "must be >= 1");
  v.AtMost("cluster.workers", c.workers(), kMaxWorkers);
  v.Require(c.trainers() >= 1, "cluster.trainers", c.trainers(),
            "must be >= 1");
  v.AtMost("cluster.trainers", c.trainers(), kMaxTrainers);
  v.Require(c.lease_ms() >= 100, "cluster.lease_ms", c.lease_ms(),
            "must be >= 100");
  v.Require(c.heartbeat_ms() >= 10, "cluster.heartbeat_ms", c.heartbeat_ms(),
            "must be >= 10");
  // In 64 bits: twice an int32 overflows it (found by fuzz/config_fuzzer).
  v.Require(int64_t{c.heartbeat_ms()} * 2 <= c.lease_ms(),
            "cluster.heartbeat_ms", c.heartbeat_ms(),
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
  v.AtMost("cluster.worker_capacity_bytes", c.worker_capacity_bytes(),
           kMaxWorkerCapacityBytes);
  v.Require(c.crash_loop_deaths() >= 1, "cluster.crash_loop_deaths",
            c.crash_loop_deaths(), "must be >= 1");
  v.Require(c.crash_loop_window_ms() >= 0, "cluster.crash_loop_window_ms",
            c.crash_loop_window_ms(), "must be >= 0");
  v.Require(c.probation_ms() >= 0, "cluster.probation_ms", c.probation_ms(),
            "must be >= 0");
  v.Require(c.move_timeout_ms() > 0, "cluster.move_timeout_ms",
            c.move_timeout_ms(), "must be > 0");

  const auto& m = config.model();
  v.Require(m.num_layers() >= 1, "model.num_layers", m.num_layers(),
            "must be >= 1");
  v.AtMost("model.num_layers", m.num_layers(), kMaxLayers);
  v.Require(m.d_model() >= 1, "model.d_model", m.d_model(), "must be >= 1");
  v.AtMost("model.d_model", m.d_model(), kMaxDModel);
  v.Require(m.d_ff() >= 1, "model.d_ff", m.d_ff(), "must be >= 1");
  v.AtMost("model.d_ff", m.d_ff(), kMaxDFf);
  v.Require(m.num_heads() >= 1, "model.num_heads", m.num_heads(),
            "must be >= 1");
  v.AtMost("model.num_heads", m.num_heads(), kMaxHeads);
  v.Require(m.num_heads() >= 1 && m.d_model() % m.num_heads() == 0,
            "model.d_model", m.d_model(),
            "must be divisible by model.num_heads (" +
                std::to_string(m.num_heads()) + ")");
  v.Require(m.vocab_size() >= 2, "model.vocab_size", m.vocab_size(),
            "must be >= 2");
  v.AtMost("model.vocab_size", m.vocab_size(), kMaxVocab);
  v.Require(m.seq_len() >= 1, "model.seq_len", m.seq_len(), "must be >= 1");
  v.AtMost("model.seq_len", m.seq_len(), kMaxSeqLen);
  v.Require(m.moe_every() >= 1, "model.moe_every", m.moe_every(),
            "must be >= 1");
  v.Require(m.moe_every() <= m.num_layers(), "model.moe_every", m.moe_every(),
            "must be <= model.num_layers (" + std::to_string(m.num_layers()) +
                ") so that the model has an MoE layer");
  v.Require(m.num_experts() >= 1, "model.num_experts", m.num_experts(),
            "must be >= 1");
  v.AtMost("model.num_experts", m.num_experts(), kMaxExperts);
  v.Require(m.top_k() >= 1 && m.top_k() <= m.num_experts(), "model.top_k",
            m.top_k(),
            "must be in [1, model.num_experts (" +
                std::to_string(m.num_experts()) + ")]");
  v.Require(m.shards_per_expert() >= 1, "model.shards_per_expert",
            m.shards_per_expert(), "must be >= 1");
  v.AtMost("model.shards_per_expert", m.shards_per_expert(),
           kMaxShardsPerExpert);
  v.Require(m.shards_per_expert() >= 1 && m.d_ff() % m.shards_per_expert() == 0,
            "model.d_ff", m.d_ff(),
            "must be divisible by model.shards_per_expert (" +
                std::to_string(m.shards_per_expert()) + ")");
  v.OneOf("model.activation", m.activation(), {"gelu", "relu", "swiglu"});
  v.Require(std::isfinite(m.capacity_factor()) && m.capacity_factor() >= 0,
            "model.capacity_factor", m.capacity_factor(),
            "must be finite and >= 0 (0 means dropless)");
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
  v.AtMost("model.dense_shards", m.dense_shards(), kMaxDenseShards);

  const auto& t = config.training();
  v.Require(t.steps() >= 0, "training.steps", t.steps(), "must be >= 0");
  v.AtMost("training.steps", t.steps(), kMaxSteps);
  v.Require(t.batch_size() >= 1, "training.batch_size", t.batch_size(),
            "must be >= 1");
  v.AtMost("training.batch_size", t.batch_size(), kMaxBatchSize);
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
  v.AtMost("training.warmup_steps", t.warmup_steps(), kMaxSteps);
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
  v.AtMost("training.threads", t.threads(), kMaxThreads);
  v.Require(t.validation_fraction() > 0 && t.validation_fraction() <= 0.5,
            "training.validation_fraction", t.validation_fraction(),
            "must be in (0, 0.5]");
  v.Require(
      std::isfinite(t.eval_capacity_factor()) && t.eval_capacity_factor() >= 0,
      "training.eval_capacity_factor", t.eval_capacity_factor(),
      "must be finite and >= 0 (0 means dropless)");
  v.Require(t.stop_at_step() >= 0 && t.stop_at_step() <= t.steps(),
            "training.stop_at_step", t.stop_at_step(),
            "must be in [0, training.steps]");

  const auto& k = config.checkpoint();
  v.Require(k.every() >= 0, "checkpoint.every", k.every(),
            "must be >= 0 (0 disables checkpoints)");
  v.Require(k.keep_last() >= 1, "checkpoint.keep_last", k.keep_last(),
            "must be >= 1");
  v.AtMost("checkpoint.keep_last", k.keep_last(), kMaxKeepLast);
  v.Require(k.replicas() >= 0, "checkpoint.replicas", k.replicas(),
            "must be >= 0");
  v.Require(k.max_consecutive_failures() >= 0,
            "checkpoint.max_consecutive_failures", k.max_consecutive_failures(),
            "must be >= 0 (0 trains on whatever fails)");
  v.Require(k.commit_timeout_ms() >= 1, "checkpoint.commit_timeout_ms",
            k.commit_timeout_ms(), "must be >= 1");
  v.Require(k.replicas() < c.workers(), "checkpoint.replicas", k.replicas(),
            "must be < cluster.workers (" + std::to_string(c.workers()) +
                "): a replica lives on another worker");

  const auto& x = config.transport();
  v.OneOf("transport.backend", x.backend(), {"ucx", "nccl"});
  v.Require(x.backend() != "nccl", "transport.backend", "'nccl'",
            "is not available: the NCCL data plane is not built yet; use ucx");
  v.Require(!x.data_host().empty(), "transport.data_host", "''",
            "must not be empty");
  v.Require(x.request_timeout_ms() >= 1, "transport.request_timeout_ms",
            x.request_timeout_ms(), "must be >= 1");
  v.Require(x.max_inflight_bytes() >= 1, "transport.max_inflight_bytes",
            x.max_inflight_bytes(), "must be >= 1");
  v.AtMost("transport.max_inflight_bytes", x.max_inflight_bytes(),
           kMaxInflightBytes);
  v.Require(x.busy_poll_us() >= 0 && x.busy_poll_us() <= 1000000,
            "transport.busy_poll_us", x.busy_poll_us(),
            "must be in [0, 1000000]");
  v.Require(x.max_busy_poll_us() >= 0 && x.max_busy_poll_us() <= 1000000,
            "transport.max_busy_poll_us", x.max_busy_poll_us(),
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
  const auto& r = config.replication();
  v.Require(r.window_steps() >= 1 && r.window_steps() <= 1000000,
            "replication.window_steps", r.window_steps(),
            "must be in [1, 1000000]");
  v.Require(r.max_replicas() >= 1 && r.max_replicas() <= 64,
            "replication.max_replicas", r.max_replicas(), "must be in [1, 64]");
  v.Require(r.reserved_bytes() >= 0, "replication.reserved_bytes",
            r.reserved_bytes(), "must be >= 0");
  v.AtMost("replication.reserved_bytes", r.reserved_bytes(),
           kMaxInflightBytes * 64);
  v.Require(std::isfinite(r.hot_load()) && r.hot_load() > 1,
            "replication.hot_load", r.hot_load(),
            "must be > 1 (the mean expert's load is 1)");
  v.Require(std::isfinite(r.cool_load()) && r.cool_load() > 0 &&
                r.cool_load() <= r.hot_load(),
            "replication.cool_load", r.cool_load(),
            "must be in (0, replication.hot_load]");
  // Every field is within its limits; now what they make together.
  RETURN_IF_ERROR(v.status());
  ValidateSizes(config, &v);
  return v.status();
}

std::vector<std::string> AllConfigFieldPaths() {
  std::vector<std::string> out;
  CollectPaths(SwitchyardConfig::descriptor(), "", &out);
  return out;
}

}  // namespace switchyard
