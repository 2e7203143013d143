#include "common/config.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>

#include "common/flags.h"
#include "common/model_shape.h"
#include "tests/testing/files.h"

namespace switchyard {
namespace {

TEST(ConfigTest, DefaultsComeFromTheSchema) {
  auto loaded = ParseConfig("", "empty.yaml", {});
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  EXPECT_EQ(loaded->config.model().num_experts(), 8);
  EXPECT_EQ(loaded->config.cluster().lease_ms(), 3000);
  EXPECT_EQ(loaded->config.training().optimizer(), "adamw");
}

TEST(ConfigTest, ParsesSectionsAndOverrides) {
  const char* yaml =
      "model:\n"
      "  num_experts: 64\n"
      "  top_k: 2\n"
      "  capacity_factor: 1.25\n"
      "  expert_bias: false\n"
      "training:\n"
      "  optimizer: adafactor\n";
  auto loaded = ParseConfig(yaml, "glam.yaml", {"model.top_k=1"});
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const auto& c = loaded->config;
  EXPECT_EQ(c.model().num_experts(), 64);
  EXPECT_EQ(c.model().top_k(), 1);
  EXPECT_DOUBLE_EQ(c.model().capacity_factor(), 1.25);
  EXPECT_FALSE(c.model().expert_bias());
  EXPECT_EQ(c.training().optimizer(), "adafactor");
  EXPECT_EQ(loaded->origins.at("model.num_experts"), "glam.yaml:2");
  EXPECT_EQ(loaded->origins.at("model.top_k"), "--set model.top_k=1");
}

struct ErrorCase {
  const char* yaml;
  std::vector<std::string> overrides;
  const char* expected;  // Exact error message.
};

class ConfigErrorTest : public ::testing::TestWithParam<ErrorCase> {};

TEST_P(ConfigErrorTest, NamesFileLineFieldValueAndRule) {
  const ErrorCase& c = GetParam();
  auto loaded = ParseConfig(c.yaml, "run.yaml", c.overrides);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(loaded.status().message(), c.expected);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ConfigErrorTest,
    ::testing::Values(
        ErrorCase{"model:\n  num_expertz: 4\n",
                  {},
                  "run.yaml:2: model.num_expertz: unknown field (known here: "
                  "num_layers, d_model, d_ff, num_heads, vocab_size, seq_len, "
                  "moe_every, num_experts, top_k, shards_per_expert, "
                  "activation, capacity_factor, aux_loss_alpha, "
                  "router_z_loss, router_jitter, expert_dropout, init_scale, "
                  "norm, positions, dense_shards, expert_bias)"},
        ErrorCase{"modle:\n  d_model: 4\n",
                  {},
                  "run.yaml:1: modle: unknown field (known here: cluster, "
                  "model, training, checkpoint, transport, replication)"},
        ErrorCase{"model:\n  num_experts: many\n",
                  {},
                  "run.yaml:2: model.num_experts: value 'many' is not an "
                  "integer"},
        ErrorCase{"model:\n  num_experts: 4000000000\n",
                  {},
                  "run.yaml:2: model.num_experts: value '4000000000' is not a "
                  "32-bit integer"},
        ErrorCase{"model:\n  expert_bias: yes\n",
                  {},
                  "run.yaml:2: model.expert_bias: value 'yes' is not a "
                  "boolean (true or false)"},
        ErrorCase{"training:\n  learning_rate: 1e999\n",
                  {},
                  "run.yaml:2: training.learning_rate: value '1e999' is not a "
                  "finite number"},
        ErrorCase{"training:\n  seed: -3\n",
                  {},
                  "run.yaml:2: training.seed: value '-3' is not a "
                  "non-negative integer"},
        ErrorCase{"model:\n  num_experts:\n",
                  {},
                  "run.yaml:2: model.num_experts: has no value"},
        ErrorCase{"model:\n  num_experts: [1, 2]\n",
                  {},
                  "run.yaml:2: model.num_experts: expected a single value, "
                  "not a list"},
        ErrorCase{"model: 3\n",
                  {},
                  "run.yaml:1: model: expected a mapping of field names to "
                  "values"},
        ErrorCase{"model:\n  d_model: [\n",
                  {},
                  "run.yaml:3: not valid YAML: end of sequence flow not found"},
        ErrorCase{"model:\n  num_experts: 8\n  top_k: 9\n",
                  {},
                  "run.yaml:3: model.top_k (9) must be in [1, "
                  "model.num_experts (8)]"},
        ErrorCase{"model:\n  d_ff: 100\n  shards_per_expert: 8\n",
                  {},
                  "run.yaml:2: model.d_ff (100) must be divisible by "
                  "model.shards_per_expert (8)"},
        ErrorCase{"replication:\n  hot_load: 0.5\n",
                  {},
                  "run.yaml:2: replication.hot_load (0.5) must be > 1 (the "
                  "mean expert's load is 1)"},
        ErrorCase{"replication:\n  cool_load: 3\n",
                  {},
                  "run.yaml:2: replication.cool_load (3) must be in (0, "
                  "replication.hot_load]"},
        ErrorCase{"replication:\n  max_replicas: 0\n",
                  {},
                  "run.yaml:2: replication.max_replicas (0) must be in [1, "
                  "64]"},
        ErrorCase{"model:\n  activation: tanh\n",
                  {},
                  "run.yaml:2: model.activation ('tanh') must be one of: "
                  "gelu, relu, swiglu"},
        ErrorCase{"",
                  {"model.d_model=30"},
                  "--set model.d_model=30: model.d_model (30) must be "
                  "divisible by model.num_heads (4)"},
        ErrorCase{"cluster:\n  lease_ms: 1000\n  heartbeat_ms: 600\n",
                  {},
                  "run.yaml:3: cluster.heartbeat_ms (600) must be at most "
                  "half of cluster.lease_ms (1000)"},
        // Twice this overflows an int32 (fuzz/config_fuzzer found it).
        ErrorCase{"",
                  {"cluster.heartbeat_ms=2000000000"},
                  "--set cluster.heartbeat_ms=2000000000: "
                  "cluster.heartbeat_ms (2000000000) must be at most half of "
                  "cluster.lease_ms (3000)"},
        ErrorCase{"cluster:\n  coordinator_address: nowhere\n",
                  {},
                  "run.yaml:2: cluster.coordinator_address (nowhere) must be "
                  "host:port with a port in 0..65535"},
        ErrorCase{"checkpoint:\n  replicas: 2\n",
                  {},
                  "run.yaml:2: checkpoint.replicas (2) must be < "
                  "cluster.workers (1): a replica lives on another worker"},
        ErrorCase{"",
                  {"checkpoint.commit_timeout_ms=0"},
                  "--set checkpoint.commit_timeout_ms=0: "
                  "checkpoint.commit_timeout_ms (0) must be >= 1"},
        ErrorCase{"training:\n  batch_size: 6\n  micro_batches: 4\n",
                  {},
                  "run.yaml:2: training.batch_size (6) must be divisible by "
                  "training.micro_batches (4)"},
        ErrorCase{"",
                  {"model.num_layers=2", "model.moe_every=3"},
                  "--set model.moe_every=3: model.moe_every (3) must be <= "
                  "model.num_layers (2) so that the model has an MoE layer"},
        ErrorCase{
            "", {"model=3"}, "--set model=3: model: is a section, not a field"},
        ErrorCase{"",
                  {"model.nope=3"},
                  "--set model.nope=3: model.nope: unknown field 'nope'"},
        ErrorCase{"",
                  {"model.top_k"},
                  "--set model.top_k: expected section.field=value"},
        ErrorCase{"",
                  {"cluster.workers=0"},
                  "--set cluster.workers=0: cluster.workers (0) must be >= "
                  "1"},
        ErrorCase{"transport:\n  ucx:\n    RNDV_THRESH: 8k\n",
                  {},
                  "run.yaml:3: transport.ucx.RNDV_THRESH ('8k') is not a UCX "
                  "setting: names are UCX_ and capitals, as `ucx_info -c` "
                  "lists them"},
        ErrorCase{"",
                  {"transport.ucx.UCX_TLS=tcp"},
                  "--set transport.ucx.UCX_TLS=tcp: transport.ucx.UCX_TLS "
                  "('tcp') is set by transport.ucx_tls"},
        ErrorCase{"transport:\n  ucx:\n    UCX_NET_DEVICES: [a, b]\n",
                  {},
                  "run.yaml:3: transport.ucx.UCX_NET_DEVICES: expected a "
                  "single value"},
        ErrorCase{"transport:\n  ucx: mlx5_0\n",
                  {},
                  "run.yaml:2: transport.ucx: expected a mapping of names to "
                  "values"},
        ErrorCase{"",
                  {"transport.ucx=UCX_NET_DEVICES"},
                  "--set transport.ucx=UCX_NET_DEVICES: transport.ucx: is a "
                  "mapping: set transport.ucx.NAME=value"},
        ErrorCase{"",
                  {"transport.ucx.UCX_NET_DEVICES="},
                  "--set transport.ucx.UCX_NET_DEVICES=: "
                  "transport.ucx.UCX_NET_DEVICES ('') must be one non-empty "
                  "line"},
        // Duplicate keys: YAML would keep the last; both lines are named.
        ErrorCase{"model:\n  d_model: 32\n  d_ff: 64\n  d_model: 64\n",
                  {},
                  "run.yaml:4: model.d_model: is given twice (also at "
                  "run.yaml:2); remove one of the two"},
        ErrorCase{"model:\n  d_model: 32\ntraining:\n  steps: 3\nmodel:\n"
                  "  d_ff: 64\n",
                  {},
                  "run.yaml:5: model: is given twice (also at run.yaml:1); "
                  "remove one of the two"},
        ErrorCase{"transport:\n  ucx:\n    UCX_NET_DEVICES: a\n"
                  "    UCX_NET_DEVICES: b\n",
                  {},
                  "run.yaml:4: transport.ucx.UCX_NET_DEVICES: is given twice "
                  "(also at run.yaml:3); remove one of the two"},
        // The NCCL data plane does not exist yet: no silent UCX instead.
        ErrorCase{"transport:\n  backend: nccl\n",
                  {},
                  "run.yaml:2: transport.backend ('nccl') is not available: "
                  "the NCCL data plane is not built yet; use ucx"},
        // Sizes past Switchyard's limits (each used to end the process in
        // an uncaught std::bad_alloc or an unnamed tensor error).
        ErrorCase{"",
                  {"training.batch_size=2000000000"},
                  "--set training.batch_size=2000000000: training.batch_size "
                  "(2000000000) must be <= 1048576 (Switchyard's limit for "
                  "this field)"},
        ErrorCase{"model:\n  num_experts: 2000000000\n",
                  {},
                  "run.yaml:2: model.num_experts (2000000000) must be <= 8192 "
                  "(Switchyard's limit for this field)"},
        ErrorCase{"",
                  {"model.d_model=2147483644"},
                  "--set model.d_model=2147483644: model.d_model (2147483644) "
                  "must be <= 65536 (Switchyard's limit for this field)"},
        ErrorCase{"",
                  {"model.seq_len=4000000"},
                  "--set model.seq_len=4000000: model.seq_len (4000000) must "
                  "be <= 1048576 (Switchyard's limit for this field)"},
        // Products of fields within their limits.
        ErrorCase{"model:\n  d_model: 4096\n  num_heads: 32\n"
                  "  vocab_size: 4194304\n",
                  {},
                  "run.yaml:4: model.vocab_size (4194304) makes tok_embed and "
                  "lm_head each (model.vocab_size 4194304 x model.d_model "
                  "4096 x 4) 68719476736 bytes (64 GiB), more than "
                  "Switchyard's limit of 17179869184 bytes (16 GiB)"},
        ErrorCase{"",
                  {"model.num_layers=1024", "model.moe_every=1",
                   "model.num_experts=8192"},
                  "--set model.num_experts=8192: model.num_experts (8192) "
                  "makes the expert shards (model.num_experts 8192 x "
                  "model.shards_per_expert 1 x MoE layers 1024) 8388608 "
                  "shards, more than Switchyard's limit of 1048576 shards"},
        ErrorCase{"",
                  {"training.batch_size=65536", "model.seq_len=4096"},
                  "--set training.batch_size=65536: training.batch_size "
                  "(65536) makes one micro-batch (65536 sequences "
                  "(training.batch_size 65536 / training.micro_batches 1) x "
                  "model.seq_len 4096) 268435456 tokens, more than "
                  "Switchyard's limit of 16777216 tokens"},
        ErrorCase{"",
                  {"training.batch_size=1024", "model.vocab_size=4194304"},
                  "--set training.batch_size=1024: training.batch_size (1024) "
                  "makes one micro-batch's logits (1024 sequences "
                  "(training.batch_size 1024 / training.micro_batches 1) x "
                  "model.seq_len 64 x model.vocab_size 4194304 x 4) "
                  "1099511627776 bytes (1024 GiB), more than Switchyard's "
                  "limit of 17179869184 bytes (16 GiB)"},
        ErrorCase{"",
                  {"model.num_layers=1024", "model.d_model=4096",
                   "model.num_heads=32", "model.d_ff=16384",
                   "model.dense_shards=1024"},
                  "--set model.num_layers=1024: model.num_layers (1024) "
                  "makes a trainer's memory (dense parameters and their "
                  "gradients, one micro-batch's activations) at least "
                  "1207190978560 bytes (1124 GiB), more than Switchyard's "
                  "limit of 274877906944 bytes (256 GiB)"},
        ErrorCase{"",
                  {"transport.max_inflight_bytes=100000"},
                  "--set transport.max_inflight_bytes=100000: "
                  "transport.max_inflight_bytes (100000) must be at least "
                  "131072: what a worker may hold of one MoE layer's "
                  "micro-batch (cluster.trainers 1 x 8 sequences "
                  "(training.batch_size 8 / training.micro_batches 1) x "
                  "model.seq_len 64 x model.top_k 1 x "
                  "model.shards_per_expert 1 x model.d_model 64 x 4 bytes of "
                  "training.wire_dtype); raise it or training.micro_batches"}));

// transport.ucx: UCX settings from the file and from --set, which replaces
// a value the file gave.
TEST(ConfigTest, UcxSettingsFromFileAndOverrides) {
  const char* yaml =
      "transport:\n"
      "  ucx:\n"
      "    UCX_NET_DEVICES: mlx5_0:1\n"
      "    UCX_RNDV_THRESH: 64k\n";
  auto loaded = ParseConfig(
      yaml, "rdma.yaml",
      {"transport.ucx.UCX_RNDV_THRESH=8k", "transport.ucx.UCX_IB_GID_INDEX=3"});
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const auto& ucx = loaded->config.transport().ucx();
  ASSERT_EQ(ucx.size(), 3u);
  EXPECT_EQ(ucx.at("UCX_NET_DEVICES"), "mlx5_0:1");
  EXPECT_EQ(ucx.at("UCX_RNDV_THRESH"), "8k");
  EXPECT_EQ(ucx.at("UCX_IB_GID_INDEX"), "3");
  EXPECT_EQ(loaded->origins.at("transport.ucx.UCX_NET_DEVICES"), "rdma.yaml:3");
  EXPECT_EQ(loaded->origins.at("transport.ucx.UCX_RNDV_THRESH"),
            "--set transport.ucx.UCX_RNDV_THRESH=8k");
}

// Every count and size field has an upper limit: its type's largest value
// is refused at load, naming the field and the limit, for each of them.
TEST(ConfigTest, EverySizeFieldHasALimit) {
  const char* kInt32Max = "2147483647";
  const char* kInt64Max = "9223372036854775807";
  const std::vector<std::pair<std::string, const char*>> fields = {
      {"cluster.workers", kInt32Max},
      {"cluster.trainers", kInt32Max},
      {"cluster.worker_capacity_bytes", kInt64Max},
      {"model.num_layers", kInt32Max},
      {"model.d_model", kInt32Max},
      {"model.d_ff", kInt32Max},
      {"model.num_heads", kInt32Max},
      {"model.vocab_size", kInt32Max},
      {"model.seq_len", kInt32Max},
      {"model.num_experts", kInt32Max},
      {"model.shards_per_expert", kInt32Max},
      {"model.dense_shards", kInt32Max},
      {"training.steps", kInt64Max},
      {"training.batch_size", kInt32Max},
      {"training.warmup_steps", kInt64Max},
      {"training.threads", kInt32Max},
      {"checkpoint.keep_last", kInt32Max},
      {"transport.max_inflight_bytes", kInt64Max}};
  for (const auto& [path, max] : fields) {
    const std::string set = path + "=" + max;
    auto loaded = ParseConfig("", "run.yaml", {set});
    ASSERT_FALSE(loaded.ok()) << set;
    EXPECT_EQ(
        loaded.status().message().rfind(
            "--set " + set + ": " + path + " (" + max + ") must be <= ", 0),
        0u)
        << loaded.status().message();
  }
}

// A configuration file is a regular file: a device would never end and a
// FIFO would block.
TEST(ConfigTest, ConfigFileMustBeARegularFile) {
  for (const char* path : {"/dev/zero", "/dev/urandom", "/tmp"}) {
    auto loaded = LoadConfig(path, {});
    ASSERT_FALSE(loaded.ok()) << path;
    EXPECT_EQ(loaded.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(loaded.status().message().find("not a regular file"),
              std::string::npos)
        << loaded.status().message();
  }
  const std::string fifo = ::testing::TempDir() + "/switchyard_config_fifo_" +
                           std::to_string(::getpid());
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto loaded = LoadConfig(fifo, {});
  ::unlink(fifo.c_str());
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().message(),
            "config file: '" + fifo + "' is a FIFO, not a regular file");
}

TEST(ConfigTest, MissingFileIsNamed) {
  auto loaded = LoadConfig("/nonexistent/run.yaml", {});
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.status().message().find("/nonexistent/run.yaml"),
            std::string::npos);
}

TEST(ConfigTest, ExamplesLoad) {
  for (const char* name : {"tiny.yaml", "glam.yaml"}) {
    auto loaded = LoadConfig(
        std::string(SWITCHYARD_SOURCE_DIR) + "/examples/" + name, {});
    EXPECT_TRUE(loaded.ok()) << name << ": " << loaded.status().ToString();
  }
  auto glam = LoadConfig(
      std::string(SWITCHYARD_SOURCE_DIR) + "/examples/glam.yaml", {});
  ASSERT_TRUE(glam.ok());
  EXPECT_EQ(glam->config.model().num_experts(), 64);
  EXPECT_EQ(glam->config.model().top_k(), 2);
  EXPECT_EQ(glam->config.model().moe_every(), 2);
}

TEST(ConfigTest, EveryFieldIsDocumented) {
  const std::string doc = testing::ReadFile(std::string(SWITCHYARD_SOURCE_DIR) +
                                            "/docs/configuration.md");
  ASSERT_FALSE(doc.empty());
  for (const std::string& path : AllConfigFieldPaths()) {
    EXPECT_NE(doc.find("`" + path + "`"), std::string::npos)
        << path << " is missing from docs/configuration.md";
  }
}

TEST(ModelShapeTest, CountsShardsOfGlamShape) {
  auto loaded = ParseConfig(
      "model:\n  num_layers: 64\n  moe_every: 2\n  num_experts: 64\n"
      "  shards_per_expert: 8\n  d_ff: 1024\n  dense_shards: 16\n",
      "glam.yaml", {});
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const auto shards = ModelShards(loaded->config);
  EXPECT_EQ(NumMoeLayers(loaded->config.model()), 32);
  ASSERT_EQ(shards.size(), 32u * 64 * 8 + 16);
  EXPECT_EQ(shards.front().id, ShardId::Expert(0, 0, 0));
  EXPECT_EQ(shards[32 * 64 * 8 - 1].id, ShardId::Expert(31, 63, 7));
  EXPECT_EQ(shards.back().id, ShardId::Dense(15));
  // d_model 64, d_ff/8 = 128: W1 64x128 + b1 128 + W2 128x64 (+ b2 64 on
  // shard 0). AdamW: params, grads and two moments, fp32 each.
  EXPECT_EQ(shards[0].num_params, 64 * 128 + 128 + 128 * 64 + 64);
  EXPECT_EQ(shards[1].num_params, 64 * 128 + 128 + 128 * 64);
  EXPECT_EQ(shards[1].bytes, 16 * shards[1].num_params);
  int64_t dense = 0;
  for (size_t i = 32 * 64 * 8; i < shards.size(); ++i) {
    dense += shards[i].num_params;
  }
  EXPECT_EQ(dense, DenseParams(loaded->config.model()));
}

// The most dense shards of a model with the most layers, a valid config:
// ModelShards (the coordinator's first step) rebuilt the whole dense layout
// for every dense shard and took minutes (fuzz/config_fuzzer: over 10 s
// under ASan); now one layout for all.
TEST(ModelShapeTest, ModelShardsOfTheLargestDenseTableIsQuick) {
  auto loaded = ParseConfig("", "test",
                            {"model.num_layers=1024", "model.moe_every=1024",
                             "model.dense_shards=65536"});
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const auto start = std::chrono::steady_clock::now();
  const auto shards = ModelShards(loaded->config);
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_EQ(shards.size(), 8u + 65536);
  int64_t dense = 0;
  for (size_t i = 8; i < shards.size(); ++i) dense += shards[i].num_params;
  EXPECT_EQ(dense, DenseParams(loaded->config.model()));
  EXPECT_LT(took, std::chrono::seconds(5));
}

TEST(FlagParserTest, ParsesAndRejects) {
  std::string name = "worker-0";
  int64_t count = 1;
  bool json = false;
  std::vector<std::string> sets;
  FlagParser parser("test", "a test");
  parser.AddString("name", &name, "the name");
  parser.AddInt("count", &count, "how many");
  parser.AddBool("json", &json, "json output");
  parser.AddRepeated("set", &sets, "overrides");
  const char* argv[] = {"prog",   "cmd",   "--name", "w1",          "--count=5",
                        "--json", "--set", "a.b=1",  "--set=c.d=2", "extra"};
  ASSERT_TRUE(parser.Parse(10, const_cast<char**>(argv), 2).ok());
  EXPECT_EQ(name, "w1");
  EXPECT_EQ(count, 5);
  EXPECT_TRUE(json);
  EXPECT_EQ(sets, (std::vector<std::string>{"a.b=1", "c.d=2"}));
  EXPECT_EQ(parser.positional(), (std::vector<std::string>{"extra"}));
  EXPECT_NE(parser.Help().find("--count VALUE"), std::string::npos);

  FlagParser strict("test", "a test");
  strict.AddInt("count", &count, "how many");
  const char* bad[] = {"prog", "cmd", "--count", "x"};
  EXPECT_EQ(strict.Parse(4, const_cast<char**>(bad), 2).message(),
            "--count: 'x' is not an integer");
  const char* unknown[] = {"prog", "cmd", "--nope"};
  EXPECT_EQ(strict.Parse(3, const_cast<char**>(unknown), 2).message(),
            "unknown flag --nope (see --help)");
  const char* missing[] = {"prog", "cmd", "--count"};
  EXPECT_EQ(strict.Parse(3, const_cast<char**>(missing), 2).message(),
            "--count needs a value");
}

}  // namespace
}  // namespace switchyard
