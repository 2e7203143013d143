// Writes the fuzzers' seed inputs (fuzz/corpus/<fuzzer>/) from the real
// encoders and writers, so that the seeds stay valid as the formats change:
// frames from EncodeFrame, a safetensors file from WriteSafetensors, a
// shard checkpoint's manifest, chunks and SST file from the checkpoint
// store, a coordinator snapshot from ClusterState, replica requests as a
// primary sends them. Deterministic but for
// the timestamps the writers record.
//
// Usage: fuzz_seed_corpus OUT_DIR   (run from the source tree: the config
// seeds are examples/*.yaml). Scratch files go to a temp dir, removed after.
#include <rocksdb/options.h>
#include <rocksdb/sst_file_reader.h>
#include <rocksdb/table_properties.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "common/config.h"
#include "coordinator/cluster_state.h"
#include "fuzz/fuzz_support.h"
#include "storage/checkpoint_store.h"
#include "storage/safetensors.h"
#include "storage/sst_chunk_reader.h"
#include "transport/control/frame.h"
#include "transport/ucx/peer_auth.h"
#include "transport/wire_header.h"

namespace switchyard {
namespace {

namespace fs = std::filesystem;

std::string out_dir;

void Write(const std::string& fuzzer, const std::string& name,
           const std::string& bytes) {
  fs::create_directories(out_dir + "/" + fuzzer);
  std::ofstream out(out_dir + "/" + fuzzer + "/" + name, std::ios::binary);
  out << bytes;
  FUZZ_CHECK(out.good());
}

std::string Read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string Le(uint64_t v, int bytes) {
  std::string out;
  for (int i = 0; i < bytes; ++i) out += static_cast<char>(v >> (8 * i));
  return out;
}

std::string Bytes(const void* p, size_t n) {
  return std::string(static_cast<const char*>(p), n);
}

void FrameSeeds() {
  using namespace control;
  Envelope hello;
  hello.set_request_id(1);
  hello.mutable_hello()->set_protocol_version(1);
  hello.mutable_hello()->set_client_nonce(std::string(32, 'n'));
  hello.mutable_hello()->set_client_proof(std::string(32, 'p'));
  Envelope reg;
  reg.set_request_id(2);
  auto* r = reg.mutable_register_request();
  r->set_kind(WORKER);
  r->set_name("worker-0");
  r->set_control_address("127.0.0.1:7000");
  r->set_data_address("127.0.0.1:7001");
  r->set_capacity_bytes(1 << 30);
  r->set_rank(-1);
  Envelope beat;
  beat.set_request_id(3);
  beat.mutable_heartbeat()->set_name("worker-0");
  beat.mutable_heartbeat()->set_incarnation(4);
  Envelope error;
  error.set_request_id(3);
  error.set_is_response(true);
  error.mutable_error()->set_message("fenced");
  const std::string stream =
      EncodeFrame(hello) + EncodeFrame(reg) + EncodeFrame(beat);
  Write("frame_fuzzer", "stream", std::string("\xff\x07", 2) + stream);
  Write("frame_fuzzer", "one_byte_splits",
        std::string("\x10\x00", 2) + EncodeFrame(reg) + EncodeFrame(error));
  Write("frame_fuzzer", "truncated",
        std::string("\x40\x01", 2) + stream.substr(0, stream.size() - 3));
  Write("frame_fuzzer", "oversized",
        std::string("\x00\x02", 2) + EncodeFrame(reg));
}

void WireSeeds() {
  using namespace transport;
  WireHeader h;
  h.kind = static_cast<uint8_t>(MessageKind::kExpertForward);
  h.dtype = static_cast<uint8_t>(DType::kF32);
  h.request_id = 9;
  h.epoch = 3;
  h.step = 5;
  h.layer = 1;
  h.expert = 2;
  h.rows = 4;
  h.cols = 8;
  h.payload_bytes = 4 * 8 * 4;
  Write("wire_fuzzer", "forward", Bytes(&h, sizeof(h)));
  h.dtype = static_cast<uint8_t>(DType::kBF16);
  h.payload_bytes = 4 * 8 * 2;
  Write("wire_fuzzer", "forward_sizes",
        Bytes(&h, sizeof(h)) + std::string(1, '\x50') + Le(64, 8) +
            Le(1 << 20, 8));
  WireHeader e;
  e.kind = static_cast<uint8_t>(MessageKind::kDensePush);
  e.status_code = 9;
  e.payload_bytes = 6;
  Write("wire_fuzzer", "error_response", Bytes(&e, sizeof(e)));
  const std::string nonce(kAuthFieldBytes, 'n'), proof(kAuthFieldBytes, 'p');
  const AuthMessage hello = MakeAuthMessage(AuthStep::kHello, nonce);
  const AuthMessage challenge =
      MakeAuthMessage(AuthStep::kChallenge, nonce, proof);
  Write("wire_fuzzer", "auth_hello", Bytes(&hello, sizeof(hello)));
  Write("wire_fuzzer", "auth_challenge", Bytes(&challenge, sizeof(challenge)));
}

void ConfigSeeds() {
  for (const char* name : {"tiny", "demo", "glam"}) {
    Write("config_fuzzer", name,
          Read(std::string("examples/") + name + ".yaml"));
  }
  Write("config_fuzzer", "tiny_overrides",
        Read("examples/tiny.yaml") +
            std::string("\0model.num_experts=16\0training.steps=5\0"
                        "transport.ucx.UCX_RNDV_THRESH=8192",
                        72));
  Write("config_fuzzer", "overrides_only",
        std::string("\0cluster.workers=3\0checkpoint.replicas=2", 41));
}

void SafetensorsSeeds(const std::string& scratch) {
  auto a = Tensor::Zeros(DType::kF32, {2, 3}).value();
  auto b = Tensor::Zeros(DType::kBF16, {4}).value();
  for (int i = 0; i < 6; ++i) static_cast<float*>(a.data())[i] = i * 0.5f;
  const std::string one = scratch + "/one.safetensors";
  FUZZ_CHECK(
      storage::WriteSafetensors(one, {{"w1", a}, {"b1", b}}, {{"format", "pt"}})
          .ok());
  Write("safetensors_fuzzer", "file", std::string(1, '\0') + Read(one));
  const std::string two = scratch + "/two.safetensors";
  FUZZ_CHECK(storage::WriteSafetensors(two, {{"w2", a}}, {}).ok());
  const std::string index =
      R"({"metadata":{},"weight_map":{"w1":"model-00001.safetensors",)"
      R"("b1":"model-00001.safetensors","w2":"model-00002.safetensors"}})";
  const std::string first = Read(one);
  Write("safetensors_fuzzer", "directory",
        std::string(1, '\1') + Le(index.size(), 4) + index +
            Le(first.size(), 4) + first + Read(two));
}

void CheckpointSeeds(const std::string& scratch) {
  storage::CheckpointStoreOptions options;
  options.chunk_bytes = 64;  // Several chunks per tensor.
  auto store = storage::OpenCheckpointStore(scratch + "/ckpt", options).value();
  storage::ShardSnapshot snapshot;
  snapshot.shard = "L0.E1.S0";
  snapshot.step = 7;
  snapshot.epoch = 2;
  auto w1 = Tensor::Zeros(DType::kF32, {4, 10}).value();
  auto m = Tensor::Zeros(DType::kBF16, {4, 10}).value();
  for (int i = 0; i < 40; ++i) static_cast<float*>(w1.data())[i] = i;
  snapshot.tensors = {{"w1", w1}, {"opt.w1.m", m}, {"opt.absent", Tensor()}};
  const auto manifest = store->WriteShard(snapshot).value();
  const std::string bytes = manifest.SerializeAsString();
  std::string chunks;
  for (const auto& named : snapshot.tensors) {
    const char* p = static_cast<const char*>(named.tensor.data());
    for (size_t off = 0; off < named.tensor.num_bytes(); off += 64) {
      const size_t n = std::min<size_t>(64, named.tensor.num_bytes() - off);
      chunks += Le(n, 2) + std::string(p + off, n);
    }
  }
  for (const char* mode : {"\0", "\1"}) {
    Write("checkpoint_manifest_fuzzer",
          std::string("shard_") + (*mode ? "into" : "new"),
          std::string(mode, 1) + Le(bytes.size(), 2) + bytes + chunks);
  }
  Write("checkpoint_manifest_fuzzer", "manifest_only",
        std::string(1, '\0') + Le(bytes.size(), 2) + bytes);
  // The chunk file: the SST whose chunk property lists the shard's keys.
  store.reset();
  rocksdb::Options rocks;
  for (const auto& entry : fs::directory_iterator(scratch + "/ckpt/db")) {
    if (entry.path().extension() != ".sst") continue;
    rocksdb::SstFileReader reader(rocks);
    if (!reader.Open(entry.path().string()).ok()) continue;
    const auto& props = reader.GetTableProperties()->user_collected_properties;
    auto found = props.find(storage::kChunkBlocksProperty);
    if (found == props.end() || found->second.empty()) continue;
    auto blocks = storage::ParseChunkBlocks(found->second).value();
    std::string input = Le(found->second.size(), 2) + found->second;
    int listed = 0;
    for (const auto& [key, offset] : blocks) {
      if (listed++ == 8) break;
      // Keys in order are w1's chunks (tensor 0000), then opt.w1.m's.
      const auto& tm =
          manifest.tensors(key.find("/0000/") != std::string::npos ? 0 : 1);
      const uint64_t c =
          std::stoull(key.substr(key.rfind('/') + 1), nullptr, 16);
      const uint64_t n = std::min<uint64_t>(64, tm.bytes() - c * 64);
      input += Le(n, 2) + Le(tm.chunk_xxh3(c), 8);
    }
    Write("sst_chunk_fuzzer", "chunk_file", input + Read(entry.path()));
  }
}

void CoordinatorSeeds() {
  auto config = ParseConfig(Read("examples/tiny.yaml") +
                                "\ncheckpoint:\n  every: 10\n  replicas: 1\n",
                            "tiny", {"cluster.trainers=2"})
                    .value()
                    .config;
  coordinator::ClusterState state(config);
  const auto now = coordinator::Clock::time_point() + std::chrono::hours(1000);
  for (int i = 0; i < 2; ++i) {
    control::RegisterRequest w;
    w.set_kind(control::WORKER);
    w.set_name("worker-" + std::to_string(i));
    w.set_capacity_bytes(int64_t{1} << 33);
    w.set_host(i == 0 ? "a" : "b");
    w.set_rank(-1);
    FUZZ_CHECK(state.Register(w, now).ok());
    control::RegisterRequest t;
    t.set_kind(control::TRAINER);
    t.set_name("trainer-" + std::to_string(i));
    t.set_rank(i);
    FUZZ_CHECK(state.Register(t, now).ok());
  }
  control::CoordinatorSnapshot snapshot = state.Snapshot();
  control::CommittedCheckpoint* c = snapshot.add_committed();
  c->set_step(10);
  c->set_shards(snapshot.shard_home_size());
  for (const auto& home : snapshot.shard_home()) {
    c->add_holder(home);
    c->add_digest("00");
    c->add_replicas("");
  }
  const std::string bytes = snapshot.SerializeAsString();
  Write("coordinator_snapshot_fuzzer", "tiny_config",
        std::string(1, '\0') + bytes);
  Write("coordinator_snapshot_fuzzer", "own_config",
        std::string(1, '\1') + bytes);
  control::CoordinatorSnapshot fresh =
      coordinator::ClusterState(config).Snapshot();
  Write("coordinator_snapshot_fuzzer", "fresh",
        std::string(1, '\1') + fresh.SerializeAsString());
}

// replica_fuzzer's input (fuzz/replica_fuzzer.cc): a step of one
// replicated chunk as a primary drives its copy: weights, the forward and
// backward of two micro-batches, the share, the drop; payload values after.
void ReplicaSeeds() {
  // kind (0 weights .. 4 drop), epoch, step, micro-batch, layer << 4 |
  // expert, chunk << 4 | shard, payload form, rows.
  const auto request = [](int kind, int mb, int form, int rows) {
    const uint8_t r[8] = {static_cast<uint8_t>(kind),
                          0,
                          1,
                          static_cast<uint8_t>(mb),
                          0x01,
                          0x10,
                          static_cast<uint8_t>(form),
                          static_cast<uint8_t>(rows)};
    return std::string(reinterpret_cast<const char*>(r), sizeof(r));
  };
  for (const auto& [name, flags] :
       {std::pair{"step_fp32", 0x1c}, std::pair{"step_bf16", 0x1d},
        std::pair{"step_dropout", 0x1e}, std::pair{"step_tight", 0x00}}) {
    const int rows_form = (flags & 2) != 0 ? 2 : 1;  // x, or x and keep.
    std::string input = {static_cast<char>(flags), 7};
    input += request(0, 0, 3, 0);
    input += request(1, 0, rows_form, 5);
    input += request(2, 0, 1, 5);
    input += request(1, 1, rows_form, 3);
    input += request(2, 1, 1, 3);
    input += request(3, 2, 0, 0);
    input += request(4, 0, 0, 0);
    for (int i = 0; i < 64; ++i) input += static_cast<char>((i * 37) % 251);
    Write("replica_fuzzer", name, input);
  }
}

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) {
  using namespace switchyard;
  if (argc != 2) {
    std::cerr << "usage: fuzz_seed_corpus OUT_DIR\n";
    return 2;
  }
  fuzz::QuietLogging();
  out_dir = argv[1];
  const std::string& scratch = fuzz::TempDir();
  FrameSeeds();
  WireSeeds();
  ConfigSeeds();
  SafetensorsSeeds(scratch);
  CheckpointSeeds(scratch);
  CoordinatorSeeds();
  ReplicaSeeds();
  return 0;
}
