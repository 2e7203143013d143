#include "cli/checkpoint_tools.h"

#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <memory>
#include <sstream>

#include "common/model_shape.h"
#include "coordinator/placement.h"
#include "expert_worker/worker_process.h"
#include "storage/checkpoint_store.h"
#include "storage/kv_store.h"
#include "storage/safetensors.h"
#include "trainer/layers.h"

namespace switchyard::cli {
namespace {

namespace fs = std::filesystem;

// Opened stores by worker name (each opened once, read-only).
class Stores {
 public:
  explicit Stores(const config::SwitchyardConfig& config) : config_(config) {}

  StatusOr<storage::ShardSnapshot> Read(const std::string& holder, int64_t step,
                                        const std::string& shard) {
    auto it = stores_.find(holder);
    if (it == stores_.end()) {
      ASSIGN_OR_RETURN(auto store,
                       storage::OpenCheckpointStoreReadOnly(
                           expert_worker::CheckpointDir(config_, holder)));
      it = stores_.emplace(holder, std::move(store)).first;
    }
    return it->second->ReadShard(step, shard);
  }

  // VerifyFiles on every store opened so far: one line per bad store.
  int VerifyFiles(std::ostream& out) {
    int bad = 0;
    for (const auto& [holder, store] : stores_) {
      Status s = store->VerifyFiles();
      if (!s.ok()) {
        ++bad;
        out << "BAD store of " << holder << ": " << s.ToString() << "\n";
      }
    }
    return bad;
  }
  size_t size() const { return stores_.size(); }

 private:
  const config::SwitchyardConfig config_;
  std::map<std::string, std::unique_ptr<storage::CheckpointStore>> stores_;
};

const Tensor* FindTensor(const storage::ShardSnapshot& s,
                         const std::string& name) {
  for (const auto& t : s.tensors) {
    if (t.name == name && !t.tensor.empty()) return &t.tensor;
  }
  return nullptr;
}

using Entry = storage::NamedArray;

Status WriteSafetensors(const std::string& path,
                        const std::vector<Entry>& entries, int64_t step) {
  return storage::WriteSafetensors(path, entries,
                                   {{"format", "pt"},
                                    {"source", "switchyard"},
                                    {"step", std::to_string(step)}});
}

// Columns [from, from + n) of every row of m into columns [at, at + n) of
// out. A vector is one row.
void CopyColumns(const Tensor& m, int64_t from, int64_t n, Tensor* out,
                 int64_t at) {
  const int64_t rows = m.rank() == 2 ? m.dim(0) : 1;
  const int64_t cols = m.num_elements() / rows;
  const int64_t out_cols = out->num_elements() / rows;
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(out->f32() + r * out_cols + at, m.f32() + r * cols + from,
                n * sizeof(float));
  }
}

// config.json of an export: everything needed to rebuild the model outside
// Switchyard (python/switchyard/torch/model.py reads it). Numbers are
// written with 17 significant digits, so that they read back exactly.
std::string ExportConfigJson(const config::SwitchyardConfig& config,
                             int64_t step) {
  const auto& m = config.model();
  std::ostringstream j;
  j << std::setprecision(17);
  j << "{\n  \"model_type\": \"switchyard\",\n  \"format_version\": 1,\n"
    << "  \"step\": " << step << ",\n"
    << "  \"num_layers\": " << m.num_layers() << ",\n"
    << "  \"d_model\": " << m.d_model() << ",\n"
    << "  \"d_ff\": " << m.d_ff() << ",\n"
    << "  \"num_heads\": " << m.num_heads() << ",\n"
    << "  \"vocab_size\": " << m.vocab_size() << ",\n"
    << "  \"seq_len\": " << m.seq_len() << ",\n"
    << "  \"moe_layers\": [";
  const char* sep = "";
  for (int l = 0; l < m.num_layers(); ++l) {
    if (!IsMoeLayer(m, l)) continue;
    j << sep << l;
    sep = ", ";
  }
  j << "],\n  \"num_experts\": " << m.num_experts() << ",\n"
    << "  \"top_k\": " << m.top_k() << ",\n"
    << "  \"activation\": \""
    << (m.activation() == "gelu" ? "gelu_tanh" : m.activation()) << "\",\n"
    << "  \"norm\": \"" << m.norm() << "\",\n"
    << "  \"norm_eps\": " << trainer::kNormEps << ",\n"
    << "  \"positions\": \"" << m.positions() << "\",\n"
    << "  \"rope_theta\": " << trainer::kRopeTheta << ",\n"
    << "  \"expert_bias\": " << (m.expert_bias() ? "true" : "false") << ",\n"
    << "  \"capacity_factor\": " << m.capacity_factor() << ",\n"
    << "  \"eval_capacity_factor\": "
    << config.training().eval_capacity_factor() << ",\n"
    << "  \"aux_loss_alpha\": " << m.aux_loss_alpha() << ",\n"
    << "  \"router_z_loss\": " << m.router_z_loss() << ",\n"
    << "  \"router_jitter\": " << m.router_jitter() << ",\n"
    << "  \"weight_layout\": \"in_out\",\n"
    << "  \"ffn_w1_layout\": \"gate_up\"\n}\n";
  return j.str();
}

}  // namespace

StatusOr<control::CoordinatorSnapshot> ReadCoordinatorState(
    const std::string& state_dir) {
  const std::string dir = state_dir + "/coordinator";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return NotFoundError("no coordinator state in " + dir +
                         " (is this a run directory?)");
  }
  ASSIGN_OR_RETURN(auto kv, storage::OpenRocksKvStoreReadOnly(dir));
  ASSIGN_OR_RETURN(auto bytes, kv->Get("coordinator/snapshot"));
  control::CoordinatorSnapshot state;
  if (!bytes || !state.ParseFromString(*bytes)) {
    return DataLossError("the coordinator state in " + dir +
                         " is missing or unreadable");
  }
  return state;
}

StatusOr<control::CommittedCheckpoint> FindCommitted(
    const control::CoordinatorSnapshot& state, int64_t step) {
  if (state.committed_size() == 0) {
    return NotFoundError("no committed checkpoint in this run");
  }
  if (step == 0) return state.committed(state.committed_size() - 1);
  for (const auto& c : state.committed()) {
    if (c.step() == step) return c;
  }
  return NotFoundError("no committed checkpoint at step " +
                       std::to_string(step) + " (see `switchyard ckpt ls`)");
}

void ListCheckpoints(const control::CoordinatorSnapshot& state,
                     std::ostream& out) {
  out << std::left << std::setw(10) << "STEP" << std::setw(22)
      << "COMMITTED (UTC)" << std::right << std::setw(8) << "SHARDS"
      << std::setw(14) << "BYTES"
      << "  HOLDERS\n";
  for (const auto& c : state.committed()) {
    const std::time_t t =
        static_cast<std::time_t>(c.committed_unix_ms() / 1000);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char when[32];
    std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", &tm);
    std::map<std::string, int> holders;
    for (const auto& h : c.holder()) ++holders[h];
    std::string who;
    for (const auto& [name, n] : holders) {
      who += (who.empty() ? "" : ", ") + name + " (" + std::to_string(n) + ")";
    }
    out << std::left << std::setw(10) << c.step() << std::setw(22) << when
        << std::right << std::setw(8) << c.shards() << std::setw(14)
        << coordinator::FormatBytes(static_cast<int64_t>(c.bytes())) << "  "
        << who << "\n";
  }
  if (state.committed_size() == 0) out << "(no committed checkpoint)\n";
}

Status VerifyCheckpoint(const config::SwitchyardConfig& config,
                        const control::CommittedCheckpoint& commit,
                        std::ostream& out) {
  const std::vector<ShardFootprint> shards = ModelShards(config);
  if (commit.holder_size() != static_cast<int>(shards.size()) ||
      commit.digest_size() != commit.holder_size()) {
    return DataLossError("checkpoint " + std::to_string(commit.step()) +
                         " records " + std::to_string(commit.holder_size()) +
                         " shards; the model has " +
                         std::to_string(shards.size()));
  }
  Stores stores(config);
  int bad = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string name = shards[i].id.ToString();
    auto s = stores.Read(commit.holder(i), commit.step(), name);
    std::string problem;
    if (!s.ok()) {
      problem = s.status().ToString();
    } else if (storage::SnapshotDigest(*s) != commit.digest(i)) {
      problem = "digest differs from the committed " + commit.digest(i);
    }
    if (!problem.empty()) {
      ++bad;
      out << "BAD " << name << " on " << commit.holder(i) << ": " << problem
          << "\n";
    }
  }
  if (bad > 0) {
    return DataLossError(
        std::to_string(bad) + " of " + std::to_string(shards.size()) +
        " shards of checkpoint " + std::to_string(commit.step()) + " failed");
  }
  const int bad_stores = stores.VerifyFiles(out);
  if (bad_stores > 0) {
    return DataLossError(std::to_string(bad_stores) + " of " +
                         std::to_string(stores.size()) +
                         " checkpoint stores hold damaged files");
  }
  out << "checkpoint " << commit.step() << ": " << shards.size()
      << " shards verified (every chunk checksum, manifest and digest), and "
      << "every file of the " << stores.size()
      << " stores holding them (RocksDB file and block checksums)\n";
  return OkStatus();
}

Status ExportCheckpoint(const config::SwitchyardConfig& config,
                        const control::CommittedCheckpoint& commit,
                        const std::string& out_dir, std::ostream& out) {
  const auto& m = config.model();
  const std::vector<ShardFootprint> shards = ModelShards(config);
  if (commit.holder_size() != static_cast<int>(shards.size())) {
    return DataLossError("checkpoint " + std::to_string(commit.step()) +
                         " does not match the model's shards");
  }
  std::map<std::string, std::string> holder;
  for (size_t i = 0; i < shards.size(); ++i) {
    holder[shards[i].id.ToString()] = commit.holder(i);
  }
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return UnavailableError("cannot create " + out_dir);
  Stores stores(config);
  const int64_t step = commit.step();
  std::map<std::string, std::string> weight_map;

  // Dense tensors: the dense shards' flat slices, joined and cut by layout.
  std::vector<float> flat;
  for (int d = 0; d < m.dense_shards(); ++d) {
    const std::string name = "D" + std::to_string(d);
    ASSIGN_OR_RETURN(auto s, stores.Read(holder[name], step, name));
    const Tensor* p = FindTensor(s, "params");
    if (p == nullptr) return DataLossError(name + " has no params");
    flat.insert(flat.end(), p->f32(), p->f32() + p->num_elements());
  }
  std::vector<Entry> dense;
  for (const DenseTensor& t : DenseLayout(m)) {
    std::vector<int64_t> shape = {t.rows};
    if (t.cols > 1) shape.push_back(t.cols);
    Tensor x = Tensor::Zeros(DType::kF32, shape).value();
    if (t.offset + t.numel() > static_cast<int64_t>(flat.size())) {
      return DataLossError("dense shards hold fewer values than the layout");
    }
    std::memcpy(x.f32(), flat.data() + t.offset, t.numel() * sizeof(float));
    dense.push_back({t.name, std::move(x)});
    weight_map[t.name] = "dense.safetensors";
  }
  RETURN_IF_ERROR(
      WriteSafetensors(out_dir + "/dense.safetensors", dense, step));

  // Experts: per MoE layer, each expert's shards joined along d_ff.
  const int S = m.shards_per_expert();
  const int64_t D = m.d_model(), F = m.d_ff(), f = F / S;
  const int g = FfnGates(m);
  int moe = 0;
  for (int layer = 0; layer < m.num_layers(); ++layer) {
    if (!IsMoeLayer(m, layer)) continue;
    std::vector<Entry> experts;
    for (int e = 0; e < m.num_experts(); ++e) {
      Tensor w1 = Tensor::Zeros(DType::kF32, {D, g * F}).value();
      Tensor b1 = Tensor::Zeros(DType::kF32, {g * F}).value();
      Tensor w2 = Tensor::Zeros(DType::kF32, {F, D}).value();
      Tensor b2;
      bool has_b1 = false;
      for (int s = 0; s < S; ++s) {
        const std::string name = ShardId::Expert(moe, e, s).ToString();
        ASSIGN_OR_RETURN(auto snap, stores.Read(holder[name], step, name));
        const Tensor* sw1 = FindTensor(snap, "w1");
        const Tensor* sw2 = FindTensor(snap, "w2");
        if (sw1 == nullptr || sw2 == nullptr) {
          return DataLossError(name + " lacks w1 or w2");
        }
        for (int gate = 0; gate < g; ++gate) {  // [gate | up] blocks.
          CopyColumns(*sw1, gate * f, f, &w1, gate * F + s * f);
          if (const Tensor* sb1 = FindTensor(snap, "b1")) {
            CopyColumns(*sb1, gate * f, f, &b1, gate * F + s * f);
            has_b1 = true;
          }
        }
        std::memcpy(w2.f32() + s * f * D, sw2->f32(), f * D * sizeof(float));
        if (const Tensor* sb2 = FindTensor(snap, "b2")) b2 = sb2->Clone();
      }
      const std::string p = ExpertTensorPrefix(layer, e);
      experts.push_back({p + "w1", std::move(w1)});
      if (has_b1) experts.push_back({p + "b1", std::move(b1)});
      experts.push_back({p + "w2", std::move(w2)});
      if (!b2.empty()) experts.push_back({p + "b2", std::move(b2)});
    }
    const std::string file =
        "experts-layer" + std::to_string(layer) + ".safetensors";
    for (const Entry& x : experts) weight_map[x.name] = file;
    RETURN_IF_ERROR(WriteSafetensors(out_dir + "/" + file, experts, step));
    ++moe;
  }

  std::ofstream index(out_dir + "/model.safetensors.index.json");
  index << "{\"metadata\":{\"step\":" << step << ",\"source\":\"switchyard\"},"
        << "\"weight_map\":{";
  bool first = true;
  for (const auto& [name, file] : weight_map) {
    index << (first ? "" : ",") << "\"" << name << "\":\"" << file << "\"";
    first = false;
  }
  index << "}}\n";
  index.close();
  if (!index) return UnavailableError("cannot write the index in " + out_dir);
  std::ofstream description(out_dir + "/config.json");
  description << ExportConfigJson(config, step);
  description.close();
  if (!description) {
    return UnavailableError("cannot write config.json in " + out_dir);
  }
  out << "exported checkpoint " << step << ": " << weight_map.size()
      << " tensors into " << out_dir << "\n";
  return OkStatus();
}

Status DescribeImport(const config::SwitchyardConfig& config,
                      const std::string& path, std::ostream& out) {
  ASSIGN_OR_RETURN(storage::SafetensorsReader reader,
                   storage::SafetensorsReader::Open(path));
  const auto& m = config.model();
  // Every tensor the model would take from the files, by its full shape
  // (as ShardFactory reads them), not only its element count.
  int dense_found = 0, dense_total = 0;
  for (const DenseTensor& t : DenseLayout(m)) {
    ++dense_total;
    if (!reader.Has(t.name)) continue;
    RETURN_IF_ERROR(reader.CheckShape(t.name, t.shape()));
    ++dense_found;
  }
  out << "dense tensors: " << dense_found << " of " << dense_total
      << " from the files, the rest random\n";
  const auto ffn_shapes = FfnTensorShapes(m);
  // An FFN's tensors at `prefix` that the files hold, each of the right shape.
  auto check_ffn = [&](const std::string& prefix) -> Status {
    for (const auto& [name, shape] : ffn_shapes) {
      if (reader.Has(prefix + name)) {
        RETURN_IF_ERROR(reader.CheckShape(prefix + name, shape));
      }
    }
    return OkStatus();
  };
  for (int layer = 0; layer < m.num_layers(); ++layer) {
    if (!IsMoeLayer(m, layer)) continue;
    const std::string p = "layers." + std::to_string(layer);
    int own = 0;
    for (int e = 0; e < m.num_experts(); ++e) {
      const std::string prefix = ExpertTensorPrefix(layer, e);
      if (!reader.Has(prefix + "w1")) continue;
      RETURN_IF_ERROR(check_ffn(prefix));
      ++own;
    }
    const bool upcycle = reader.Has(p + ".ffn.w1");
    if (upcycle) RETURN_IF_ERROR(check_ffn(p + ".ffn."));
    out << p << ": " << own << " of " << m.num_experts()
        << " experts from their own tensors";
    if (own < m.num_experts()) {
      out << ", " << m.num_experts() - own
          << (upcycle ? " upcycled from " + p + ".ffn" : " random");
    }
    out << "\n";
  }
  out << "start the run with --set checkpoint.init_from=" << path << "\n";
  return OkStatus();
}

}  // namespace switchyard::cli
