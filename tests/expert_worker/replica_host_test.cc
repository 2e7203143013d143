// Hot-expert replication's copies.
//
// ReplicaHost: a copy computes a chunk's forward, backward and gradient
// share with the bits the primary gets for it, and refuses what does not
// fit (no weights, other weights, a backward without its forward, a
// repeated forward, unknown shards and micro-batches, other dtypes, a
// share over another number of micro-batches, more copies than
// replication.reserved_bytes holds), and frees a copy its primary drops.
// A bf16 copy is pushed and keeps bf16 weights only (half the bytes).
//
// ReplicaClient, over real UCX data planes to two workers' ReplicaHosts:
// a shard's chunks go to the workers the coordinator ranks below this one
// (HeartbeatAck.copy_hosts), fixed for the step; a step that places them
// elsewhere drops the copies it no longer uses, and a shard cooled to one
// chunk drops them all.
#include "expert_worker/replica_host.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <future>
#include <map>
#include <random>
#include <thread>

#include "expert_worker/expert_init.h"
#include "expert_worker/replica_client.h"
#include "expert_worker/replication.h"
#include "tests/testing/data_plane_options.h"

namespace switchyard::expert_worker {
namespace {

using transport::Message;
using transport::MessageKind;

config::SwitchyardConfig Config() {
  config::SwitchyardConfig c;
  auto* m = c.mutable_model();
  m->set_num_layers(2);
  m->set_moe_every(2);
  m->set_d_model(16);
  m->set_d_ff(32);
  m->set_num_heads(2);
  m->set_num_experts(4);
  c.mutable_training()->set_threads(1);
  c.mutable_training()->set_micro_batches(2);
  c.mutable_replication()->set_enabled(true);
  return c;
}

Tensor Random(int64_t rows, int64_t cols, uint32_t seed) {
  Tensor t = Tensor::Zeros(DType::kF32, {rows, cols}).value();
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0, 0.5f);
  for (int64_t i = 0; i < t.num_elements(); ++i) t.f32()[i] = normal(gen);
  return t;
}

class ReplicaHostTest : public ::testing::Test {
 protected:
  ReplicaHostTest()
      : config_(Config()),
        shape0_(ExpertShardShape(config_, 0).value()),
        gemm_(NewCpuGemm(1)),
        ffn_(shape0_, gemm_.get()) {}

  void SetUp() override { StartHost(); }

  void StartHost() {
    host_ = std::make_unique<ReplicaHost>(config_, "worker-9", shape0_, shape0_,
                                          gemm_.get());
    host_->Start();
  }

  // The host's answer to one request.
  StatusOr<Tensor> Ask(MessageKind kind, int64_t step, int32_t mb,
                       Tensor payload, int expert = 1, uint64_t epoch = 4) {
    transport::WireHeader h;
    h.kind = static_cast<uint8_t>(kind);
    h.epoch = epoch;
    h.step = step;
    h.micro_batch = mb;
    h.layer = 0;
    h.expert = expert;
    h.shard = 0;
    h.trainer_rank = 1;
    std::promise<Message> answer;
    host_->Handle({transport::TensorMessage(h, std::move(payload)),
                   [&](Message m) { answer.set_value(std::move(m)); }});
    Message m = answer.get_future().get();
    if (m.header.status_code != 0) {
      return Status(static_cast<StatusCode>(m.header.status_code),
                    m.error_text);
    }
    return std::move(m.payload);
  }

  // Copies computing in bf16 from now on (a fresh host).
  void UseBf16() {
    config_.mutable_training()->set_compute_dtype("bf16");
    shape0_ = ExpertShardShape(config_, 0).value();
    ffn_ = ExpertFfn(shape0_, gemm_.get());
    host_->Shutdown();
    StartHost();
  }

  // What the primary of `p` pushes its copies.
  Tensor Weights(const ExpertParams& p) {
    return WeightsForCopies(p, shape0_.compute_dtype).value();
  }

  // Pushes expert `expert`'s weights of step 3 (Params(seed)).
  Status Push(int expert, uint32_t seed) {
    return Ask(MessageKind::kReplicaWeights, 3, 0, Weights(Params(seed)),
               expert)
        .status();
  }

  ExpertParams Params(uint32_t seed) {
    ExpertParams p = ExpertParams::Zeros(shape0_).value();
    for (Tensor* t : {&p.w1, &p.b1, &p.w2, &p.b2}) {
      Tensor r = Random(1, t->num_elements(), seed++);
      std::memcpy(t->data(), r.data(), t->num_bytes());
    }
    return p;
  }

  // AChunkHasThePrimarysBits, with or without expert dropout.
  void ChunkHasThePrimarysBits(bool dropout) {
    const ExpertParams p = Params(7);
    const int64_t d = shape0_.d_model, f = shape0_.d_ff_shard;
    ASSERT_TRUE(Ask(MessageKind::kReplicaWeights, 3, 0, Weights(p)).ok());
    // Two micro-batches of a chunk, as the primary would compute them.
    ExpertParams want = ExpertParams::Zeros(shape0_).value();
    std::vector<Tensor> xs, as, dhs, dys;
    for (int mb = 0; mb < 2; ++mb) {
      const int64_t rows = 5 + mb;
      Tensor x = Random(rows, d, 100 + mb), dy = Random(rows, d, 200 + mb);
      std::vector<float> keep;
      Tensor payload = x.Clone();
      if (dropout) {
        payload = Tensor::Zeros(DType::kF32, {rows, d + f}).value();
        for (int64_t r = 0; r < rows; ++r) {
          std::memcpy(payload.f32() + r * (d + f), x.f32() + r * d,
                      d * sizeof(float));
          for (int64_t c = 0; c < f; ++c) {
            keep.push_back((r + c + mb) % 3 == 0 ? 0.0f : 4.0f / 3);
            payload.f32()[r * (d + f) + d + c] = keep.back();
          }
        }
      }
      const float* k = dropout ? keep.data() : nullptr;
      Tensor h = Tensor::Zeros(DType::kF32, {rows, f}).value();
      Tensor y = Tensor::Zeros(DType::kF32, {rows, d}).value();
      ASSERT_TRUE(ffn_.Forward(p, x, k, &h, &y).ok());
      auto got_y = Ask(MessageKind::kReplicaForward, 3, mb, payload);
      ASSERT_TRUE(got_y.ok()) << got_y.status().ToString();
      ASSERT_EQ(got_y->num_bytes(), y.num_bytes());
      EXPECT_EQ(std::memcmp(got_y->data(), y.data(), y.num_bytes()), 0);
      Tensor dh = Tensor::Zeros(DType::kF32, {rows, f}).value();
      Tensor a = Tensor::Zeros(DType::kF32, {rows, f}).value();
      Tensor dx = Tensor::Zeros(DType::kF32, {rows, d}).value();
      ASSERT_TRUE(ffn_.BackwardInput(p, h, dy, k, &dh, &a, &dx).ok());
      auto got_dx = Ask(MessageKind::kReplicaBackward, 3, mb, dy.Clone());
      ASSERT_TRUE(got_dx.ok()) << got_dx.status().ToString();
      EXPECT_EQ(std::memcmp(got_dx->data(), dx.data(), dx.num_bytes()), 0);
      xs.push_back(x);
      as.push_back(a);
      dhs.push_back(dh);
      dys.push_back(dy);
    }
    // A forward without its keep multipliers is refused.
    EXPECT_EQ(Ask(MessageKind::kReplicaForward, 3, 0,
                  dropout ? Random(2, d, 1) : Random(2, d + f, 1))
                  .status()
                  .code(),
              StatusCode::kInvalidArgument);
    // The share: one GEMM over both micro-batches' rows, in order.
    const auto cat = [](const std::vector<Tensor>& parts) {
      int64_t rows = 0;
      for (const Tensor& t : parts) rows += t.dim(0);
      Tensor out = Tensor::Zeros(DType::kF32, {rows, parts[0].dim(1)}).value();
      char* dst = static_cast<char*>(out.data());
      for (const Tensor& t : parts) {
        std::memcpy(dst, t.data(), t.num_bytes());
        dst += t.num_bytes();
      }
      return out;
    };
    ASSERT_TRUE(
        ffn_.ComputeGrads(cat(xs), cat(as), cat(dhs), cat(dys), &want).ok());
    // A share over another number of micro-batches than the copy holds is
    // refused (the primary then computes it itself).
    EXPECT_EQ(Ask(MessageKind::kReplicaShare, 3, 1, Tensor()).status().code(),
              StatusCode::kFailedPrecondition);
    // Weights pushed again within the step keep what the copy holds.
    ASSERT_TRUE(Ask(MessageKind::kReplicaWeights, 3, 0, Weights(p)).ok());
    auto share = Ask(MessageKind::kReplicaShare, 3, 2, Tensor());
    ASSERT_TRUE(share.ok()) << share.status().ToString();
    const Tensor flat = FlattenParams(want).value();
    ASSERT_EQ(share->num_bytes(), flat.num_bytes());
    EXPECT_EQ(std::memcmp(share->data(), flat.data(), flat.num_bytes()), 0);
    // Taken: a second ask has nothing.
    auto again = Ask(MessageKind::kReplicaShare, 3, 0, Tensor());
    ASSERT_TRUE(again.ok());
    EXPECT_TRUE(again->empty());
  }

  config::SwitchyardConfig config_;
  ExpertShape shape0_;
  std::unique_ptr<Gemm> gemm_;
  ExpertFfn ffn_;
  std::unique_ptr<ReplicaHost> host_;
};

// With and without expert dropout (each row's keep multipliers travel
// after its x).
TEST_F(ReplicaHostTest, AChunkHasThePrimarysBits) {
  for (const bool dropout : {false, true}) {
    SCOPED_TRACE(dropout ? "expert dropout" : "no dropout");
    if (dropout) {
      config_.mutable_model()->set_expert_dropout(0.25);
      host_->Shutdown();
      StartHost();
    }
    ChunkHasThePrimarysBits(dropout);
  }
}

// A bf16 copy is sent, and keeps, the bf16 weights its products multiply
// by and the fp32 biases: half the weights' bytes, the same bits.
TEST_F(ReplicaHostTest, ABf16CopyHoldsBf16WeightsWithThePrimarysBits) {
  UseBf16();
  ChunkHasThePrimarysBits(false);
  // The primary's own bf16 copies give the same push as its fp32 weights.
  ExpertParams p = Params(3);
  const Tensor converted = Weights(p);
  ASSERT_TRUE(p.RefreshBf16().ok());
  const Tensor kept = Weights(p);
  ASSERT_EQ(kept.num_bytes(), converted.num_bytes());
  EXPECT_EQ(std::memcmp(kept.data(), converted.data(), kept.num_bytes()), 0);
  // Bytes held per copy: bf16 w1 and w2, fp32 biases, and the fp32
  // gradient share's buffers.
  const int64_t weights = p.w1.num_elements() + p.w2.num_elements();
  const int64_t biases = p.b1.num_elements() + p.b2.num_elements();
  EXPECT_EQ(converted.num_bytes(), 2 * weights + 4 * biases);
  host_->Shutdown();
  StartHost();
  ASSERT_TRUE(Push(1, 1).ok());
  EXPECT_EQ(host_->bytes(),
            (2 * weights + 4 * biases) + 4 * (weights + biases));
  // The fp32 form is not what a bf16 copy takes.
  EXPECT_EQ(Ask(MessageKind::kReplicaWeights, 3, 0,
                FlattenParams(Params(1)).value(), 2)
                .status()
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(
      Ask(MessageKind::kReplicaForward, 3, 0, Random(2, shape0_.d_model, 1), 1)
          .ok());
}

TEST_F(ReplicaHostTest, RefusesWhatDoesNotFitAndKeepsServing) {
  const int64_t d = shape0_.d_model;
  const auto code = [](const StatusOr<Tensor>& r) { return r.status().code(); };
  EXPECT_EQ(code(Ask(MessageKind::kReplicaForward, 3, 0, Random(2, d, 1))),
            StatusCode::kFailedPrecondition)
      << "no weights yet";
  ASSERT_TRUE(
      Ask(MessageKind::kReplicaWeights, 3, 0, FlattenParams(Params(1)).value())
          .ok());
  EXPECT_EQ(code(Ask(MessageKind::kReplicaForward, 4, 0, Random(2, d, 1))),
            StatusCode::kFailedPrecondition)
      << "the weights of another step";
  EXPECT_EQ(
      code(Ask(MessageKind::kReplicaForward, 3, 0, Random(2, d, 1), 1, 5)),
      StatusCode::kFailedPrecondition)
      << "another epoch";
  EXPECT_EQ(code(Ask(MessageKind::kReplicaBackward, 3, 0, Random(2, d, 1))),
            StatusCode::kFailedPrecondition)
      << "a backward without its forward";
  EXPECT_EQ(code(Ask(MessageKind::kReplicaForward, 3, 0, Random(2, d + 1, 1))),
            StatusCode::kInvalidArgument)
      << "rows of another width";
  EXPECT_EQ(code(Ask(MessageKind::kReplicaForward, 3, 0,
                     Tensor::Zeros(DType::kBF16, {2, d}).value())),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Ask(MessageKind::kReplicaForward, 3, 0, Random(2, d, 1), 9)),
            StatusCode::kNotFound)
      << "no expert 9";
  EXPECT_EQ(code(Ask(MessageKind::kReplicaForward, 3, 2, Random(2, d, 1))),
            StatusCode::kInvalidArgument)
      << "micro-batch 2 of 2";
  EXPECT_EQ(code(Ask(MessageKind::kReplicaWeights, 3, 0, Random(1, 5, 1))),
            StatusCode::kInvalidArgument)
      << "weights of another size";
  // The copy is still there and serves, once.
  ASSERT_TRUE(
      Ask(MessageKind::kReplicaWeights, 3, 0, FlattenParams(Params(1)).value())
          .ok());
  EXPECT_TRUE(Ask(MessageKind::kReplicaForward, 3, 0, Random(2, d, 1)).ok());
  EXPECT_EQ(code(Ask(MessageKind::kReplicaForward, 3, 0, Random(2, d, 1))),
            StatusCode::kAlreadyExists);
  EXPECT_EQ(code(Ask(MessageKind::kReplicaBackward, 3, 0, Random(3, d, 1))),
            StatusCode::kInvalidArgument)
      << "more rows than its forward";
}

TEST_F(ReplicaHostTest, CopiesLiveWithinTheReservedBytes) {
  const int64_t d = shape0_.d_model;
  // Room for one copy (its fp32 weights and its share's buffers): the
  // second evicts the first.
  const int64_t one = 2 * FlattenParams(Params(1)).value().num_bytes();
  config_.mutable_replication()->set_reserved_bytes(one + one / 2);
  host_->Shutdown();
  StartHost();
  ASSERT_TRUE(Push(1, 1).ok());
  ASSERT_TRUE(Push(2, 2).ok());
  EXPECT_EQ(host_->bytes(), one);
  EXPECT_EQ(Ask(MessageKind::kReplicaForward, 3, 0, Random(2, d, 1), 1)
                .status()
                .code(),
            StatusCode::kFailedPrecondition)
      << "evicted";
  EXPECT_TRUE(Ask(MessageKind::kReplicaForward, 3, 0, Random(2, d, 1), 2).ok());
  // Room for the weights, not for a large chunk's activations: that chunk
  // is refused, a small one still served, and the share frees them.
  const int64_t f = shape0_.gates() * shape0_.d_ff_shard;
  config_.mutable_replication()->set_reserved_bytes(one + 10 * (d + f) * 4);
  host_->Shutdown();
  StartHost();
  ASSERT_TRUE(Push(1, 1).ok());
  EXPECT_EQ(Ask(MessageKind::kReplicaForward, 3, 0, Random(11, d, 1), 1)
                .status()
                .code(),
            StatusCode::kResourceExhausted);
  ASSERT_TRUE(Ask(MessageKind::kReplicaForward, 3, 0, Random(4, d, 1), 1).ok());
  ASSERT_TRUE(
      Ask(MessageKind::kReplicaBackward, 3, 0, Random(4, d, 2), 1).ok());
  EXPECT_GT(host_->bytes(), one);
  ASSERT_TRUE(Ask(MessageKind::kReplicaShare, 3, 1, Tensor(), 1).ok());
  EXPECT_EQ(host_->bytes(), one);
  // No room at all.
  config_.mutable_replication()->set_reserved_bytes(one / 2);
  host_->Shutdown();
  StartHost();
  EXPECT_EQ(Push(1, 1).code(), StatusCode::kResourceExhausted);
}

TEST_F(ReplicaHostTest, ADroppedCopyFreesItsMemoryAndCountsItsRows) {
  const int64_t d = shape0_.d_model;
  ASSERT_TRUE(Push(1, 1).ok());
  ASSERT_TRUE(Push(2, 2).ok());
  const int64_t two = host_->bytes();
  ASSERT_GT(two, 0);
  ASSERT_TRUE(Ask(MessageKind::kReplicaForward, 3, 0, Random(5, d, 1), 1).ok());
  ASSERT_TRUE(Ask(MessageKind::kReplicaForward, 3, 1, Random(2, d, 2), 2).ok());
  EXPECT_EQ(host_->TakeRowsServed(), 7u);
  EXPECT_EQ(host_->TakeRowsServed(), 0u) << "counted since the last call";
  // Activations count: a forward keeps x and the hidden activations.
  const int64_t f = shape0_.gates() * shape0_.d_ff_shard;
  EXPECT_EQ(host_->bytes(), two + 7 * (d + f) * 4);
  // The primary of expert 1 drops its copy: its memory goes, expert 2's
  // stays and serves.
  ASSERT_TRUE(Ask(MessageKind::kReplicaDrop, 3, 0, Tensor(), 1).ok());
  EXPECT_EQ(host_->bytes(), two / 2 + 2 * (d + f) * 4);
  EXPECT_EQ(Ask(MessageKind::kReplicaForward, 3, 1, Random(2, d, 1), 1)
                .status()
                .code(),
            StatusCode::kFailedPrecondition)
      << "dropped";
  EXPECT_TRUE(
      Ask(MessageKind::kReplicaBackward, 3, 1, Random(2, d, 3), 2).ok());
  // The backward keeps x, dy and the weight-gradient inputs instead.
  EXPECT_EQ(host_->bytes(), two / 2 + 2 * (2 * d + f + shape0_.d_ff_shard) * 4);
  // Dropping what is not there changes nothing.
  ASSERT_TRUE(Ask(MessageKind::kReplicaDrop, 3, 0, Tensor(), 1).ok());
  ASSERT_TRUE(Ask(MessageKind::kReplicaDrop, 3, 0, Tensor(), 2).ok());
  EXPECT_EQ(host_->bytes(), 0);
  // Weights of the dropped step that come after the drop (sent ahead) are
  // refused; the next step's are taken, and a late drop of an older step
  // leaves them.
  EXPECT_EQ(Push(1, 1).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(host_->bytes(), 0);
  ASSERT_TRUE(Ask(MessageKind::kReplicaWeights, 4, 0,
                  FlattenParams(Params(1)).value(), 1)
                  .ok());
  ASSERT_TRUE(Ask(MessageKind::kReplicaDrop, 3, 0, Tensor(), 1).ok());
  EXPECT_EQ(host_->bytes(), two / 2);
  EXPECT_TRUE(Ask(MessageKind::kReplicaForward, 4, 0, Random(2, d, 1), 1).ok());
}

// A worker hosting copies: its data plane serves its ReplicaHost.
struct CopyHost {
  CopyHost(const config::SwitchyardConfig& config, const std::string& name,
           const ExpertShape& shape, Gemm* gemm)
      : host(config, name, shape, shape, gemm) {
    host.Start();
    plane = transport::NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
    EXPECT_TRUE(
        plane
            ->Start([this](transport::Message request, transport::Reply reply) {
              host.Handle({std::move(request), std::move(reply)});
            })
            .ok());
  }
  ~CopyHost() {
    plane->Shutdown();
    host.Shutdown();
  }
  ReplicaHost host;
  std::unique_ptr<transport::DataPlane> plane;
};

class ReplicaClientTest : public ::testing::Test {
 protected:
  ReplicaClientTest()
      : config_(Config()),
        shape_(ExpertShardShape(config_, 0).value()),
        gemm_(NewCpuGemm(1)) {}

  void SetUp() override {
    for (const char* name : {"w1", "w2"}) {
      hosts_[name] =
          std::make_unique<CopyHost>(config_, name, shape_, gemm_.get());
    }
    plane_ =
        transport::NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
    ASSERT_TRUE(plane_->Start(transport::RefuseRequests("w0")).ok());
    client_ = std::make_unique<ReplicaClient>(config_, "w0", plane_.get());
    client_->SetRouting(Table(5, {}));
    params_ = ExpertParams::Zeros(shape_).value();
    for (Tensor* t : {&params_.w1, &params_.b1, &params_.w2, &params_.b2}) {
      Tensor r = Random(1, t->num_elements(), 3);
      std::memcpy(t->data(), r.data(), t->num_bytes());
    }
  }

  // The routing table of `epoch`: workers w0 (this one), w1 and w2, and
  // expert e's shard 0 of layer 0 on worker[e] for each e in `worker`.
  control::RoutingTable Table(uint64_t epoch,
                              const std::map<int, int>& worker) {
    control::RoutingTable table;
    table.set_epoch(epoch);
    for (const char* name : {"w0", "w1", "w2"}) {
      auto* w = table.add_workers();
      w->set_name(name);
      w->set_confirmed(true);
      w->set_data_address(name == std::string("w0")
                              ? plane_->address()
                              : hosts_[name]->plane->address());
    }
    for (const auto& [expert, index] : worker) {
      auto* e = table.add_entries();
      e->mutable_shard()->set_kind(control::EXPERT);
      e->mutable_shard()->set_expert(expert);
      e->set_worker(index);
    }
    return table;
  }

  void TearDown() override {
    client_.reset();
    plane_->Shutdown();
    hosts_.clear();
  }

  // Chunk `chunk`'s forward of expert 1's micro-batch `mb` at `step`
  // (after BeginStep with `chunks`): whether a copy computed it.
  bool Forward(int64_t step, int chunks, int chunk, int mb = 0,
               int expert = 1) {
    const ShardId id = ShardId::Expert(0, expert, 0);
    client_->BeginStep(id, 5, step, chunks);
    Tensor x = Tensor::Zeros(DType::kF32, {3, shape_.d_model}).value();
    auto pending =
        client_->Start(MessageKind::kReplicaForward, id, params_, 5, step, mb,
                       chunk, std::move(x), client_->NewDeadline());
    return pending != nullptr && client_->Wait(*pending).ok();
  }

  // Asks `name`'s copy of expert 1 for the forward of micro-batch 1 at
  // `step` (chunk 9, rows the test never checks): OK when it holds that
  // step's weights.
  Status StepOf(const std::string& name, int64_t step) {
    transport::WireHeader h;
    h.kind = static_cast<uint8_t>(MessageKind::kReplicaForward);
    h.epoch = 5;
    h.step = step;
    h.micro_batch = 1;
    h.expert = 1;
    h.trainer_rank = 9;
    std::promise<transport::Message> answer;
    hosts_[name]->host.Handle(
        {transport::TensorMessage(h, Random(1, shape_.d_model, 1)),
         [&](transport::Message m) { answer.set_value(std::move(m)); }});
    const transport::Message m = answer.get_future().get();
    return Status(static_cast<StatusCode>(m.header.status_code), m.error_text);
  }

  // Waits (up to 10 s) until `name`'s copies hold some memory or none, as
  // asked.
  bool HostHolds(const std::string& name, bool some) {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      if ((hosts_[name]->host.bytes() > 0) == some) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }

  config::SwitchyardConfig config_;
  ExpertShape shape_;
  std::unique_ptr<Gemm> gemm_;
  std::map<std::string, std::unique_ptr<CopyHost>> hosts_;
  std::unique_ptr<transport::DataPlane> plane_;
  std::unique_ptr<ReplicaClient> client_;
  ExpertParams params_;
};

TEST_F(ReplicaClientTest, ChunksGoToTheLessLoadedWorkersAndCooledCopiesGo) {
  // w2 is less loaded than this worker, w1 more: only w2 takes copies.
  client_->SetCopyHosts({"w2", "w0", "w1"});
  ASSERT_TRUE(Forward(1, 3, 1));
  EXPECT_FALSE(Forward(1, 3, 2)) << "one worker below this one: one copy";
  EXPECT_TRUE(HostHolds("w2", true));
  EXPECT_FALSE(hosts_["w1"]->host.bytes() > 0);
  EXPECT_EQ(client_->TakeRowsOffloaded(), 3u);
  // The ranking changes within the step: the step keeps its hosts.
  client_->SetCopyHosts({"w1", "w0", "w2"});
  ASSERT_TRUE(Forward(1, 3, 1, 1));
  EXPECT_EQ(hosts_["w1"]->host.bytes(), 0);
  // The next step goes to w1, and w2's copy is dropped.
  ASSERT_TRUE(Forward(2, 3, 1));
  EXPECT_TRUE(HostHolds("w1", true));
  EXPECT_TRUE(HostHolds("w2", false)) << "the copy w2 no longer serves stays";
  // w2 is a candidate again, and the offset would pick it for the one
  // chunk; the step keeps w1, still a candidate (a move costs a push).
  client_->SetCopyHosts({"w1", "w2", "w0"});
  ASSERT_TRUE(Forward(3, 2, 1));
  EXPECT_TRUE(HostHolds("w1", true));
  EXPECT_EQ(hosts_["w2"]->host.bytes(), 0);
  // Every other worker above this one: both take chunks, in order.
  client_->SetCopyHosts({"w0", "w1", "w2"});
  ASSERT_TRUE(Forward(4, 3, 1));
  ASSERT_TRUE(Forward(4, 3, 2));
  EXPECT_TRUE(HostHolds("w2", true));
  // After the update, the weights of step 5 go ahead to both hosts: each
  // serves a forward of step 5 before the primary's first one.
  ASSERT_FALSE(StepOf("w1", 5).ok());
  client_->PushAhead(ShardId::Expert(0, 1, 0), params_, 5, 5);
  for (const char* host : {"w1", "w2"}) {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(10);
    Status got = StepOf(host, 5);
    while (!got.ok() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      got = StepOf(host, 5);
    }
    EXPECT_TRUE(got.ok()) << host << ": " << got.ToString();
  }
  ASSERT_TRUE(Forward(5, 3, 1));
  // Cooled to one chunk: every copy goes, nothing is offloaded.
  EXPECT_FALSE(Forward(6, 1, 1));
  EXPECT_TRUE(HostHolds("w1", false));
  EXPECT_TRUE(HostHolds("w2", false));
  EXPECT_EQ(client_->TakeRowsOffloaded(), 6 * 3u);
}

TEST_F(ReplicaClientTest, CopiesOfAShardMovedAwayAreDropped) {
  client_->SetCopyHosts({"w2", "w0", "w1"});
  // Experts 1 and 2 each have a copy on w2 (the one worker ranked below).
  ASSERT_TRUE(Forward(1, 2, 1, 0, /*expert=*/1));
  ASSERT_TRUE(Forward(1, 2, 1, 0, /*expert=*/2));
  const int64_t both = hosts_["w2"]->host.bytes();
  ASSERT_GT(both, 0);
  // Epoch 6 moves expert 1 to w1 and keeps expert 2 here: expert 1's copy
  // goes at once, expert 2's stays (its next step decides).
  client_->SetRouting(Table(6, {{1, 1}, {2, 0}}));
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (hosts_["w2"]->host.bytes() != both / 2 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(hosts_["w2"]->host.bytes(), both / 2);
}

}  // namespace
}  // namespace switchyard::expert_worker
