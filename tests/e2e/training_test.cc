// Training end to end: `switchyard up` with 3 workers and 2 trainers as
// separate processes on loopback must end with every shard's parameters and
// optimizer state bit-identical to the single-process reference
// (`switchyard train --reference`) after 20 steps, and two distributed runs
// must be bit-identical to each other.
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli/checkpoint_tools.h"
#include "common/model_shape.h"
#include "expert_worker/worker_process.h"
#include "storage/checkpoint_store.h"
#include "tests/testing/corpus_dir_test.h"
#include "tests/testing/files.h"
#include "tests/testing/processes.h"
#include "tests/testing/run_command.h"

namespace switchyard {
namespace {

using testing::Digests;
using testing::RunSwitchyard;

class TrainingTest : public testing::CorpusDirTest {
 protected:
  TrainingTest() : CorpusDirTest("training") {}

  // Flags shared by every run: the tiny model, top-2 with jitter and two
  // micro-batches so that every randomised and accumulated path is covered.
  std::string Flags() const {
    return " --config " + std::string(SWITCHYARD_SOURCE_DIR) +
           "/examples/tiny.yaml --data " + dir_ +
           "/data --set training.steps=20 --set training.micro_batches=2"
           " --set model.top_k=2 --set model.router_jitter=0.01"
           " --set training.log_every=5 --set training.eval_every=10"
           " --set cluster.trainers=2 --set cluster.workers=3"
           " --set training.threads=1";
  }

  // Whether `output`'s workers used copies of their hot shards with no
  // failure (`failures` false), or saw failures (true).
  static bool CopiesUsed(const std::string& output, bool failures) {
    static const std::regex kCopies(
        R"(worker-\d: [1-9]\d* chunks and [1-9]\d* gradient shares computed )"
        R"(by copies elsewhere, 0 failures)");
    static const std::regex kFailures(
        R"(computed by copies elsewhere, [1-9]\d* failures)");
    return std::regex_search(output, failures ? kFailures : kCopies);
  }

  // A run on 3 workers with `flags` whose copies evict each other (room
  // for one copy per worker: tiny.yaml's expert shard is 132,352 bytes in
  // fp32, twice with its gradient share's buffers), so that forwards,
  // backwards and gradient shares of copies fail at every point of a step
  // and the primaries compute those chunks themselves: still `want`'s bits.
  void ExpectEvictingCopiesKeepTheBits(
      const std::string& flags,
      const std::map<std::string, std::string>& want) {
    const auto evicting = RunSwitchyard(
        "up --workers 3 --trainers 2 --run-dir " + dir_ + "/evicting" +
            Flags() + flags + " --set replication.reserved_bytes=300000",
        180);
    ASSERT_EQ(evicting.exit_code, 0) << evicting.output;
    EXPECT_TRUE(CopiesUsed(evicting.output, /*failures=*/true))
        << evicting.output;
    EXPECT_EQ(Digests(evicting.output), want) << evicting.output;
  }

  testing::CommandResult Distributed(const std::string& name) {
    return RunSwitchyard(
        "up --workers 3 --trainers 2 --run-dir " + dir_ + "/" + name + Flags(),
        180);
  }
};

TEST_F(TrainingTest, DistributedRunsMatchTheReferenceBitForBit) {
  const auto reference =
      RunSwitchyard("train --reference --sample-bytes 0" + Flags());
  ASSERT_EQ(reference.exit_code, 0) << reference.output;
  const auto want = Digests(reference.output);
  // tiny.yaml: 2 MoE layers x 8 experts, plus 2 dense shards.
  ASSERT_EQ(want.size(), 18u) << reference.output;

  const auto first = Distributed("run1");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_NE(first.output.find("[trainer-0] step 20/20 loss"), std::string::npos)
      << first.output;
  EXPECT_NE(first.output.find("validation loss"), std::string::npos);
  EXPECT_NE(first.output.find("every trainer has exited: training done"),
            std::string::npos);
  EXPECT_EQ(Digests(first.output), want) << first.output;

  const auto second = Distributed("run2");
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_EQ(Digests(second.output), Digests(first.output));
}

// Checkpoints and resume: a run on 2 workers stopped at step 10 (checkpoint
// committed) and resumed by a second `up` on the same run directory with 3
// workers (shards placed anew; the new worker fetches its shards from the
// holders) ends at step 20 bit-identical to the reference trained 20 steps
// straight; the coordinator's state replaced by an older copy stops the
// run; --fresh starts over instead.
TEST_F(TrainingTest, AStoppedRunResumesBitForBit) {
  const std::string ckpt =
      " --set checkpoint.every=5 --set cluster.heartbeat_ms=200";
  const auto reference =
      RunSwitchyard("train --reference --sample-bytes 0" + Flags());
  ASSERT_EQ(reference.exit_code, 0) << reference.output;
  const auto want = Digests(reference.output);
  ASSERT_EQ(want.size(), 18u);

  const std::string run =
      " --trainers 2 --run-dir " + dir_ + "/resume" + Flags() + ckpt;
  const std::string up = "up --workers 3" + run;
  const auto first = RunSwitchyard(
      "up --workers 2" + run + " --set training.stop_at_step=10", 180);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_NE(first.output.find("[trainer-0] checkpoint 10 committed"),
            std::string::npos)
      << first.output;
  EXPECT_TRUE(Digests(first.output).empty()) << "stopped before the end";
  // The coordinator's state as of step 10, for (*) below.
  const std::string state = dir_ + "/resume/coordinator";
  std::filesystem::copy(state, dir_ + "/old_coordinator",
                        std::filesystem::copy_options::recursive);

  const auto second = RunSwitchyard(up, 180);
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("resuming at step 10"), std::string::npos)
      << second.output;
  // The third worker, new to the run, gets shards: handed over live by the
  // two that restored them (at step 10, or a boundary soon after when it
  // joined while they were still restoring), or fetched from their
  // checkpoints (a rollback to step 10).
  static const std::regex kMoved(
      R"((worker-2: took over [1-9]\d* shards live at step \d+ )|)"
      R"((restored \d+ shards from checkpoint 10 \(\d+ from memory, [1-9]\d* fetched from peers\)))");
  EXPECT_TRUE(std::regex_search(second.output, kMoved)) << second.output;
  EXPECT_EQ(Digests(second.output), want) << second.output;

  // (*) The coordinator's state replaced by its older copy (newest commit
  // 10) while the workers were told of later commits: the coordinator finds
  // out at their registration and stops, and so does `up` (before: it
  // resumed from checkpoint 10, which the workers had already dropped).
  std::filesystem::remove_all(state);
  std::filesystem::rename(dir_ + "/old_coordinator", state);
  const auto older = RunSwitchyard(up, 180);
  EXPECT_EQ(older.exit_code, 1) << older.output;
  EXPECT_NE(older.output.find("this coordinator's state is older than its "
                              "members know"),
            std::string::npos)
      << older.output;

  // --fresh: from scratch again, and still the same 20 steps.
  const auto fresh = RunSwitchyard(up + " --fresh", 180);
  ASSERT_EQ(fresh.exit_code, 0) << fresh.output;
  EXPECT_EQ(fresh.output.find("resuming at step"), std::string::npos);
  EXPECT_EQ(Digests(fresh.output), want);
}

// Hot-expert replication (docs/replication.md), with a plan window of 3
// steps and a hot_load that some experts of a top-2 router reach: shards
// replicate (the reference logs the first plans, decided at the end of
// step 2) and add their gradients chunk by chunk (other bits than without
// replication); a distributed run, whose primaries send chunks to copies on
// the other workers, stopped at step 10, inside a window, and resumed on 3
// workers ends bit-identical to the reference: the plans and their windows'
// counts travel with the checkpoints and live moves, and a chunk has the
// same bits wherever it runs. So does a run whose copies keep failing.
TEST_F(TrainingTest, HotExpertsReplicateAndMatchTheReferenceBitForBit) {
  const std::string replicate =
      " --set replication.enabled=true --set replication.window_steps=3"
      " --set replication.hot_load=1.05 --set replication.cool_load=1"
      " --set replication.max_replicas=3";
  const auto plain =
      RunSwitchyard("train --reference --sample-bytes 0" + Flags());
  ASSERT_EQ(plain.exit_code, 0) << plain.output;
  const auto reference =
      RunSwitchyard("train --reference --sample-bytes 0" + Flags() + replicate);
  ASSERT_EQ(reference.exit_code, 0) << reference.output;
  static const std::regex kPlanned(
      R"(L\d\.E\d\.S0: [23] replicas from step 3 )");
  EXPECT_TRUE(std::regex_search(reference.output, kPlanned))
      << reference.output;
  const auto want = Digests(reference.output);
  ASSERT_EQ(want.size(), 18u) << reference.output;
  EXPECT_NE(want, Digests(plain.output));

  const std::string run = " --trainers 2 --run-dir " + dir_ + "/replicated" +
                          Flags() + replicate +
                          " --set checkpoint.every=5 --set "
                          "cluster.heartbeat_ms=200";
  const auto first = RunSwitchyard(
      "up --workers 2" + run + " --set training.stop_at_step=10", 180);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_NE(first.output.find("[trainer-0] checkpoint 10 committed"),
            std::string::npos)
      << first.output;
  const auto second = RunSwitchyard("up --workers 3" + run, 180);
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("resuming at step 10"), std::string::npos)
      << second.output;
  EXPECT_EQ(Digests(second.output), want) << second.output;
  // The copies ran on the other workers, and none failed.
  EXPECT_TRUE(CopiesUsed(second.output, /*failures=*/false)) << second.output;
  ExpectEvictingCopiesKeepTheBits(replicate, want);
}

// The same with expert dropout, in bf16: the primaries send each chunk's
// keep multipliers with its rows, and compute a failed copy's chunk again
// with them; copies get the bf16 weights the primaries' products use (half
// the bytes); a run with copies, and one whose copies keep evicting each
// other, end bit-identical to the reference.
TEST_F(TrainingTest, HotExpertsWithExpertDropoutInBf16ReplicateBitForBit) {
  const std::string replicate =
      " --set training.compute_dtype=bf16"
      " --set model.expert_dropout=0.2 --set replication.enabled=true"
      " --set replication.window_steps=3 --set replication.hot_load=1.05"
      " --set replication.cool_load=1 --set replication.max_replicas=3";
  const auto reference =
      RunSwitchyard("train --reference --sample-bytes 0" + Flags() + replicate);
  ASSERT_EQ(reference.exit_code, 0) << reference.output;
  const auto want = Digests(reference.output);
  ASSERT_EQ(want.size(), 18u) << reference.output;
  const auto copies = RunSwitchyard("up --workers 3 --trainers 2 --run-dir " +
                                        dir_ + "/copies" + Flags() + replicate,
                                    180);
  ASSERT_EQ(copies.exit_code, 0) << copies.output;
  EXPECT_EQ(Digests(copies.output), want) << copies.output;
  EXPECT_TRUE(CopiesUsed(copies.output, /*failures=*/false)) << copies.output;
  ExpectEvictingCopiesKeepTheBits(replicate, want);
}

// Replicas (checkpoint.replicas=1): a run on 3 workers stopped at step 10
// resumes bit for bit (1) after one worker's whole checkpoint store is lost,
// from the copies on its peers, (2) after one worker's store is damaged so
// that RocksDB cannot open it (every table footer): the worker moves it
// aside, keeps running and fetches its shards the same way, (3) after a
// byte of one chunk of one shard is flipped: that shard fails its checksum
// and comes from its replica, and (4) on 2 workers, the third gone, its
// shards placed anew and restored from their replicas.
TEST_F(TrainingTest, ReplicasReplaceLostStoresAndWorkers) {
  const std::string ckpt =
      " --set checkpoint.every=5 --set checkpoint.replicas=1"
      " --set cluster.heartbeat_ms=200 --set cluster.lease_ms=1000";
  const auto reference =
      RunSwitchyard("train --reference --sample-bytes 0" + Flags());
  ASSERT_EQ(reference.exit_code, 0) << reference.output;
  const auto want = Digests(reference.output);
  for (const std::string what : {"lost", "damaged", "flipped", "shrink"}) {
    SCOPED_TRACE(what);
    const bool shrink = what == "shrink";
    const std::string run = dir_ + "/" + what;
    const std::string flags = " --trainers 2 --run-dir " + run + Flags() + ckpt;
    const auto first = RunSwitchyard(
        "up --workers 3" + flags + " --set training.stop_at_step=10", 180);
    ASSERT_EQ(first.exit_code, 0) << first.output;
    EXPECT_NE(first.output.find("replicated"), std::string::npos);
    const std::string store = run + "/checkpoints/worker-1";
    if (what == "lost") std::filesystem::remove_all(store);
    if (what == "damaged") {
      int damaged = 0;
      for (const auto& e : std::filesystem::directory_iterator(store + "/db")) {
        if (e.path().extension() != ".sst") continue;
        std::fstream f(e.path(),
                       std::ios::in | std::ios::out | std::ios::binary);
        f.seekp(-1, std::ios::end);  // The footer's magic number.
        f.put('\x5a');
        ++damaged;
      }
      ASSERT_GT(damaged, 0);
    }
    std::string flipped;  // The shard whose chunk is damaged.
    if (what == "flipped") {
      // A shard worker-1 wrote (its store also holds replicas of others'),
      // which it hosts again when the run resumes on the same workers.
      auto state = cli::ReadCoordinatorState(run);
      ASSERT_TRUE(state.ok()) << state.status().ToString();
      auto commit = cli::FindCommitted(*state, 10);
      ASSERT_TRUE(commit.ok());
      config::SwitchyardConfig config = state->config();
      const auto shards = ModelShards(config);
      for (size_t i = 0; i < shards.size(); ++i) {
        if (commit->holder(i) == "worker-1") flipped = shards[i].id.ToString();
      }
      ASSERT_FALSE(flipped.empty());
      const Status s = testing::FlipStoredByte(
          store + "/db", "ckpt/000000000000000a/" + flipped + "/", 7, 0x10);
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
    const auto second = RunSwitchyard(
        std::string("up --workers ") + (shrink ? "2" : "3") + flags, 180);
    ASSERT_EQ(second.exit_code, 0) << second.output;
    EXPECT_NE(second.output.find("resuming at step 10"), std::string::npos)
        << second.output;
    EXPECT_NE(second.output.find("fetched from peers"), std::string::npos);
    EXPECT_EQ(Digests(second.output), want) << second.output;
    if (what == "flipped") {
      EXPECT_NE(second.output.find(flipped + " at step 10 fetched from"),
                std::string::npos)
          << second.output;
      EXPECT_NE(second.output.find("does not match its checksum"),
                std::string::npos)
          << second.output;
    }
    if (what == "damaged") {
      EXPECT_NE(second.output.find("cannot be opened"), std::string::npos)
          << second.output;
      bool kept = false;
      for (const auto& e :
           std::filesystem::directory_iterator(run + "/checkpoints")) {
        kept |= e.path().filename().string().rfind("worker-1.damaged-", 0) == 0;
      }
      EXPECT_TRUE(kept) << "the damaged store was not kept";
    }
  }
}

// `switchyard ckpt`: list, verify and export a committed checkpoint of a
// SwiGLU model whose experts span two shards each. An independent reader
// (Python's standard library) reads the safetensors files; every tensor's
// sum matches the shards in the workers' stores, and a flipped byte in a
// store fails `ckpt verify`, naming the shard.
TEST_F(TrainingTest, CheckpointsListVerifyAndExport) {
  const std::string run = dir_ + "/ckpt", out = dir_ + "/export";
  const auto trained = RunSwitchyard(
      "up --workers 3 --trainers 2 --run-dir " + run + Flags() +
          " --set checkpoint.every=10 --set cluster.heartbeat_ms=200"
          " --set model.activation=swiglu --set model.shards_per_expert=2",
      180);
  ASSERT_EQ(trained.exit_code, 0) << trained.output;
  const auto ls = RunSwitchyard("ckpt ls --run-dir " + run);
  ASSERT_EQ(ls.exit_code, 0) << ls.output;
  EXPECT_NE(ls.output.find("\n10 "), std::string::npos) << ls.output;
  EXPECT_NE(ls.output.find("\n20 "), std::string::npos) << ls.output;
  const auto verify = RunSwitchyard("ckpt verify --run-dir " + run);
  EXPECT_EQ(verify.exit_code, 0) << verify.output;
  EXPECT_NE(verify.output.find("checkpoint 20: 34 shards verified"),
            std::string::npos)
      << verify.output;
  EXPECT_NE(verify.output.find("every file of the 3 stores"), std::string::npos)
      << verify.output;
  const auto exported =
      RunSwitchyard("ckpt export 20 --run-dir " + run + " --out " + out);
  ASSERT_EQ(exported.exit_code, 0) << exported.output;

  // config.json describes the model (python/switchyard/torch reads it).
  google::protobuf::Struct description;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(
                  testing::ReadFile(out + "/config.json"), &description)
                  .ok());
  const auto& f = description.fields();
  EXPECT_EQ(f.at("step").number_value(), 20);
  EXPECT_EQ(f.at("num_layers").number_value(), 4);
  EXPECT_EQ(f.at("d_ff").number_value(), 256);
  EXPECT_EQ(f.at("activation").string_value(), "swiglu");
  EXPECT_EQ(f.at("norm_eps").number_value(), 1e-5);
  EXPECT_EQ(f.at("weight_layout").string_value(), "in_out");
  const auto& moe_layers = f.at("moe_layers").list_value().values();
  ASSERT_EQ(moe_layers.size(), 2);
  EXPECT_EQ(moe_layers[0].number_value(), 1);
  EXPECT_EQ(moe_layers[1].number_value(), 3);

  // The independent reader.
  const auto reader =
      testing::RunCommand("python3 " + std::string(SWITCHYARD_SOURCE_DIR) +
                              "/tests/e2e/read_safetensors.py " + out,
                          120);
  ASSERT_EQ(reader.exit_code, 0) << reader.output;
  const std::string& json = reader.output;
  google::protobuf::Struct read;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(json, &read).ok());
  auto field = [&](const std::string& name, const char* key) {
    const auto& t = read.fields().at(name).struct_value().fields();
    return t.at(key).number_value();
  };

  // The same sums from the workers' stores.
  auto state = cli::ReadCoordinatorState(run);
  ASSERT_TRUE(state.ok()) << state.status().ToString();
  auto commit = cli::FindCommitted(*state, 20);
  ASSERT_TRUE(commit.ok());
  config::SwitchyardConfig config = state->config();
  config.mutable_cluster()->set_state_dir(run);
  const auto shards = ModelShards(config);
  std::map<std::string, storage::ShardSnapshot> snaps;
  for (size_t i = 0; i < shards.size(); ++i) {
    auto store = storage::OpenCheckpointStoreReadOnly(
        expert_worker::CheckpointDir(config, commit->holder(i)));
    ASSERT_TRUE(store.ok());
    auto s = (*store)->ReadShard(20, shards[i].id.ToString());
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    snaps[shards[i].id.ToString()] = std::move(s).value();
  }
  auto sum = [](const Tensor& t, int64_t from, int64_t n) {
    double total = 0;
    for (int64_t i = from; i < from + n; ++i) total += t.f32()[i];
    return total;
  };
  auto tensor = [&](const std::string& shard, const std::string& name) {
    for (const auto& t : snaps.at(shard).tensors) {
      if (t.name == name) return t.tensor;
    }
    return Tensor();
  };
  int checked = 0;
  // Dense: each tensor is a slice of the dense shards' concatenation.
  std::vector<float> flat;
  for (int d = 0; d < config.model().dense_shards(); ++d) {
    const Tensor p = tensor("D" + std::to_string(d), "params");
    flat.insert(flat.end(), p.f32(), p.f32() + p.num_elements());
  }
  for (const DenseTensor& t : DenseLayout(config.model())) {
    double want = 0;
    for (int64_t i = 0; i < t.numel(); ++i) want += flat[t.offset + i];
    EXPECT_NEAR(field(t.name, "sum"), want, 1e-9 * (1 + std::fabs(want)))
        << t.name;
    EXPECT_EQ(field(t.name, "first"), flat[t.offset]) << t.name;
    ++checked;
  }
  // Experts: both shards' values, in the exported tensor.
  for (int e = 0; e < config.model().num_experts(); ++e) {
    for (const char* w : {"w1", "w2"}) {
      const std::string name =
          "layers.1.experts." + std::to_string(e) + "." + w;
      const Tensor s0 = tensor("L0.E" + std::to_string(e) + ".S0", w);
      const Tensor s1 = tensor("L0.E" + std::to_string(e) + ".S1", w);
      const double want =
          sum(s0, 0, s0.num_elements()) + sum(s1, 0, s1.num_elements());
      EXPECT_NEAR(field(name, "sum"), want, 1e-9 * (1 + std::fabs(want)))
          << name;
      EXPECT_EQ(field(name, "first"), s0.f32()[0]) << name;
      ++checked;
    }
  }
  EXPECT_GT(checked, 40);

  // Import: a new run started from the export begins where it left off,
  // far below a fresh start's ln 256.
  const auto import = RunSwitchyard("ckpt import " + out + Flags() +
                                    " --set model.activation=swiglu"
                                    " --set model.shards_per_expert=2");
  EXPECT_EQ(import.exit_code, 0) << import.output;
  EXPECT_NE(import.output.find("8 of 8 experts from their own tensors"),
            std::string::npos)
      << import.output;
  auto first_loss = [](const std::string& output) {
    static const std::regex kLoss(R"(loss ([0-9.]+) \(step 1\))");
    std::smatch m;
    return std::regex_search(output, m, kLoss) ? std::stod(m[1]) : -1.0;
  };
  const std::string model =
      Flags() +
      " --set model.activation=swiglu"
      " --set model.shards_per_expert=2 --set training.steps=2";
  const auto fresh =
      RunSwitchyard("train --reference --sample-bytes 0" + model);
  const auto started =
      RunSwitchyard("train --reference --sample-bytes 0" + model +
                    " --set checkpoint.init_from=" + out);
  ASSERT_EQ(started.exit_code, 0) << started.output;
  EXPECT_GT(first_loss(fresh.output), 5.0) << fresh.output;
  EXPECT_LT(first_loss(started.output), first_loss(fresh.output) - 1.0)
      << started.output;

  // A flipped byte in one worker's store: verify names the shard.
  const Status flipped = testing::FlipStoredByte(
      expert_worker::CheckpointDir(config, commit->holder(5)) + "/db",
      "ckpt/0000000000000014/" + shards[5].id.ToString() + "/", 3, 0x20);
  ASSERT_TRUE(flipped.ok()) << flipped.ToString();
  const auto bad = RunSwitchyard("ckpt verify 20 --run-dir " + run);
  EXPECT_EQ(bad.exit_code, 1) << bad.output;
  EXPECT_NE(bad.output.find("BAD " + shards[5].id.ToString()),
            std::string::npos)
      << bad.output;
}

// Stops one thread of a process with ptrace, as a hang would (a deadlock,
// a call into a device that never returns): the rest of the process, its
// heartbeats included, runs on. Resume() (or the destructor) lets it go.
// ptrace calls must come from the thread that made it.
class StoppedThread {
 public:
  StoppedThread(pid_t pid, const std::string& name) {
    const std::string tasks = "/proc/" + std::to_string(pid) + "/task";
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(tasks, ec)) {
      std::ifstream comm(e.path() / "comm");
      std::string n;
      std::getline(comm, n);
      if (n == name) tid_ = std::stoi(e.path().filename().string());
    }
    if (tid_ <= 0) {
      error_ = "no thread " + name + " in " + tasks;
      return;
    }
    if (::ptrace(PTRACE_SEIZE, tid_, nullptr, nullptr) != 0 ||
        ::ptrace(PTRACE_INTERRUPT, tid_, nullptr, nullptr) != 0) {
      error_ = std::string("ptrace: ") + std::strerror(errno);
      return;
    }
    int status = 0;
    if (::waitpid(tid_, &status, __WALL) != tid_) {
      error_ = std::string("waitpid: ") + std::strerror(errno);
      return;
    }
    stopped_ = true;
  }
  ~StoppedThread() { Resume(); }
  void Resume() {
    if (stopped_) ::ptrace(PTRACE_DETACH, tid_, nullptr, nullptr);
    stopped_ = false;
  }
  bool stopped() const { return stopped_; }
  const std::string& error() const { return error_; }

 private:
  pid_t tid_ = -1;
  bool stopped_ = false;
  std::string error_;
};

// `up` trains 120 steps (checkpoints every 10) while `fault` strikes
// `victim_name` (its pid) past step 25; returns up's output once it has
// exited 0, and checks that the run ended bit-identical to the reference
// trained straight through.
class RecoveryTest : public TrainingTest {
 protected:
  // `extra_flags` go to the distributed run, `run_flags` to it and the
  // reference.
  std::string FaultMidRun(const std::string& victim_name,
                          const std::function<void(pid_t)>& fault,
                          const std::string& extra_flags = "",
                          const std::string& run_flags = "") {
    const std::string steps =
        " --set training.steps=120 --set training.eval_every=40"
        " --set checkpoint.every=10 --set cluster.heartbeat_ms=100"
        " --set cluster.lease_ms=1000" +
        run_flags;
    const auto reference =
        RunSwitchyard("train --reference --sample-bytes 0" + Flags() + steps);
    EXPECT_EQ(reference.exit_code, 0) << reference.output;
    const auto want = Digests(reference.output);
    EXPECT_EQ(want.size(), 18u);

    const std::string log = dir_ + "/up.log";
    std::vector<std::string> args = {
        SWITCHYARD_BINARY, "up", "--workers", "3",
        "--trainers",      "2",  "--run-dir", dir_ + "/run"};
    std::istringstream flags(Flags() + steps + extra_flags);
    for (std::string f; flags >> f;) args.push_back(f);
    const pid_t up = testing::Spawn(args, log);
    auto read_log = [&] { return testing::ReadFile(log); };
    // Training is under way past a committed checkpoint; the status table
    // `up` printed names the victim's pid.
    pid_t victim = -1;
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(90);
    // Workers' rows name their data address before the pid.
    const std::regex pid_of("\\n" + victim_name +
                            R"( +ALIVE +(?:[0-9.]+:\d+ +)?(\d+) )");
    while (std::chrono::steady_clock::now() < deadline) {
      const std::string text = read_log();
      std::smatch m;
      if (text.find("[trainer-0] step 25/") != std::string::npos &&
          std::regex_search(text, m, pid_of)) {
        victim = std::stoi(m[1]);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_GT(victim, 0) << read_log();
    if (victim <= 0) {
      testing::StopAndReap(up);
      return "";
    }
    fault(victim);
    const int code = testing::WaitExit(up, std::chrono::seconds(180));
    if (code == -1) testing::StopAndReap(up);
    const std::string text = read_log();
    EXPECT_EQ(code, 0) << text;
    EXPECT_EQ(Digests(text), want) << text;
    return text;
  }

  // SIGKILL of the victim: `up` restarts it.
  std::string KillMidRun(const std::string& victim_name,
                         const std::string& run_flags = "") {
    const std::string text = FaultMidRun(
        victim_name, [](pid_t pid) { EXPECT_EQ(::kill(pid, SIGKILL), 0); }, "",
        run_flags);
    EXPECT_NE(text.find("[up] restarting " + victim_name), std::string::npos)
        << text;
    return text;
  }
};

// A worker SIGKILLed mid-training: the cluster recovers by itself (the
// worker is fenced, every member rolls back to the newest committed
// checkpoint, the live workers from the copy they kept in memory, `up`
// restarts the worker, which rejoins) and the run ends
// bit-identical to the reference trained straight through (before: the
// trainers stopped with an error and `up` exited 1).
TEST_F(RecoveryTest, AWorkerKilledMidRunIsRecoveredBitForBit) {
  const std::string text = KillMidRun("worker-1");
  static const std::regex kRecovered(
      R"(trainer-[01]: recovery 1: epoch \d+ continues from step [1-9]\d*0 )");
  EXPECT_TRUE(std::regex_search(text, kRecovered)) << text;
  // The live workers rolled back from the copies they kept in memory.
  static const std::regex kFromMemory(
      R"(restored \d+ shards from checkpoint [1-9]\d*0 \([1-9]\d* from memory)");
  EXPECT_TRUE(std::regex_search(text, kFromMemory)) << text;
}

// Hot-expert replication through a worker's death (docs/replication.md):
// every worker hosts copies of the others' hot shards, so the one killed
// takes copies with it. The primaries compute those chunks themselves, the
// cluster rolls back as it does without replication, and the run ends
// bit-identical to the reference with the same plans.
TEST_F(RecoveryTest, AWorkerHostingCopiesKilledMidRunIsRecoveredBitForBit) {
  const std::string text = KillMidRun(
      "worker-2",
      " --set replication.enabled=true --set replication.window_steps=3"
      " --set replication.hot_load=1.05 --set replication.cool_load=1"
      " --set replication.max_replicas=3");
  static const std::regex kCopies(
      R"(worker-\d: [1-9]\d* chunks and [1-9]\d* gradient shares computed by )"
      R"(copies elsewhere)");
  EXPECT_TRUE(std::regex_search(text, kCopies)) << text;
  static const std::regex kRecovered(
      R"(trainer-[01]: recovery 1: epoch \d+ continues from step [1-9]\d*0 )");
  EXPECT_TRUE(std::regex_search(text, kRecovered)) << text;
}

// A trainer SIGKILLed mid-training: the cluster holds, the workers report
// where they stopped, and the run continues from the step in flight (or
// the one after it, when some workers had applied it) with nothing rolled
// back: at most that step is redone; `up` restarts the trainer, which rejoins
// with its rank. The run ends bit-identical (before: every member rolled back
// to the newest committed checkpoint, up to checkpoint.every steps redone).
TEST_F(RecoveryTest, ATrainerKilledMidRunRedoesOnlyTheStepInFlight) {
  const std::string text = KillMidRun("trainer-1");
  static const std::regex kRecovered(
      R"(trainer-0: recovery 1: epoch \d+ continues from step (\d+) \(the failure was at step (\d+)\))");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(text, m, kRecovered)) << text;
  const int resume = std::stoi(m[1]), failed = std::stoi(m[2]);
  // A trainer may be a step ahead of the workers (its StepDone answered,
  // its next step's requests waiting for the update), or a step behind
  // (some workers applied the step, the others then hold its gradients).
  EXPECT_GE(resume, failed - 1) << text;
  EXPECT_LE(resume, failed + 1) << text;
  EXPECT_NE(text.find("nothing rolls back"), std::string::npos) << text;
  EXPECT_EQ(text.find("rolling back from step"), std::string::npos) << text;
}

// A worker whose serving thread hangs (stopped with ptrace) while the rest
// of it heartbeats on: its lease never expires, but a trainer's request to
// it goes unanswered by its deadline (transport.request_timeout_ms), a
// probe goes unanswered too, and the trainer reports it lost. The
// coordinator fences it and every member rolls back to the newest
// committed checkpoint; let go, the worker finds it was fenced, rejoins as
// a new incarnation, and the run ends bit-identical (before: the trainers
// waited for a recovery that never came and gave up).
TEST_F(RecoveryTest, AWorkerThatStopsAnsweringIsReportedAndRecovered) {
  if (::geteuid() != 0) GTEST_SKIP() << "ptrace of another process needs root";
  const std::string log = dir_ + "/up.log";
  const std::string text = FaultMidRun(
      "worker-1",
      [&](pid_t pid) {
        StoppedThread hung(pid, "sy-worker");
        ASSERT_TRUE(hung.stopped()) << hung.error();
        // Held until the cluster has recovered without it.
        const auto until =
            std::chrono::steady_clock::now() + std::chrono::seconds(60);
        while (std::chrono::steady_clock::now() < until &&
               testing::ReadFile(log).find(": recovery 1:") ==
                   std::string::npos) {
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        hung.Resume();
      },
      " --set transport.request_timeout_ms=6000");
  static const std::regex kReported(
      R"(worker worker-1 \(incarnation \d+\) unreachable from trainer-[01] \(DEADLINE_EXCEEDED: no data-plane response[^\n]*a probe then went unanswered too)");
  EXPECT_TRUE(std::regex_search(text, kReported)) << text;
  EXPECT_EQ(text.find("lease expired"), std::string::npos) << text;
  static const std::regex kRecovered(
      R"(trainer-[01]: recovery 1: epoch \d+ continues from step [1-9]\d*0 )");
  EXPECT_TRUE(std::regex_search(text, kRecovered)) << text;
}

// learning_rate 1e30: the loss is non-finite from the second step. The run
// stops there with the trainers' error naming the step and rank (before:
// it trained on, committed NaN checkpoints and exited 0).
TEST_F(TrainingTest, ADivergedRunStopsWithAClearError) {
  const auto r = RunSwitchyard(
      "up --workers 2 --trainers 2 --run-dir " + dir_ + "/diverged" + Flags() +
          " --set training.learning_rate=1e30 --set training.warmup_steps=0"
          " --set checkpoint.every=1 --set transport.request_timeout_ms=5000",
      120);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  static const std::regex kError(
      R"(\[trainer-[01]\] switchyard: INVALID_ARGUMENT: .*non-finite loss at step \d+, rank [01])");
  EXPECT_TRUE(std::regex_search(r.output, kError)) << r.output;
}

TEST_F(TrainingTest, TrainerWithoutDataSaysSo) {
  const auto r =
      RunSwitchyard("train --reference --config " +
                    std::string(SWITCHYARD_SOURCE_DIR) + "/examples/tiny.yaml");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("set training.data_path (or pass --data PATH)"),
            std::string::npos)
      << r.output;
  const auto missing =
      RunSwitchyard("train --reference --data " + dir_ + "/nope --config " +
                    std::string(SWITCHYARD_SOURCE_DIR) + "/examples/tiny.yaml");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("is not a file or a directory"),
            std::string::npos)
      << missing.output;
}

}  // namespace
}  // namespace switchyard
