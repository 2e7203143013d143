// Fuzzes what a worker's copies (expert_worker/replica_host.h) do with the
// hot-expert replica requests a peer sends (kinds 11-15: weights, forward,
// backward, share, drop): arbitrary sequences of them, with arbitrary
// epochs, steps, micro-batches, shard ids and payloads of every form, on a
// host whose model computes in fp32 or bf16, with or without expert
// dropout, and whose replication.reserved_bytes holds from half a copy to
// four.
//
// Input: byte 0 picks the host (bit 0 bf16, bit 1 expert dropout, bits 2-4
// the reservation), byte 1 how many requests follow (at most 64); then the
// requests, 8 bytes each (kind, epoch, step, micro-batch, layer and expert,
// shard and chunk, payload form, rows), whose payload values come from the
// bytes after the requests
// (byte / 16, 0x7f NaN, 0x80 infinity). Checks: every request is answered
// exactly once; an answer has the shape its kind promises (a forward's or
// backward's rows x d_model, a share the weights' size or nothing); the
// copies never hold more than the reservation; and once the primary of
// every shard has dropped its copy, the copies hold no bytes at all.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <future>
#include <limits>
#include <vector>

#include "common/model_shape.h"
#include "expert_worker/expert_init.h"
#include "expert_worker/replica_host.h"
#include "expert_worker/replication.h"
#include "fuzz/fuzz_support.h"

namespace switchyard::expert_worker {
namespace {

using transport::Message;
using transport::MessageKind;

constexpr size_t kMaxRequests = 64;
constexpr size_t kRequestBytes = 8;

config::SwitchyardConfig Config(uint8_t flags) {
  config::SwitchyardConfig c;
  auto* m = c.mutable_model();
  m->set_num_layers(4);
  m->set_moe_every(2);
  m->set_d_model(16);
  m->set_d_ff(32);
  m->set_num_heads(2);
  m->set_num_experts(4);
  m->set_shards_per_expert(2);  // Shard 1 has no b2.
  if (flags & 2) m->set_expert_dropout(0.25);
  auto* t = c.mutable_training();
  t->set_threads(1);
  t->set_micro_batches(2);
  t->set_compute_dtype(flags & 1 ? "bf16" : "fp32");
  c.mutable_replication()->set_enabled(true);
  return c;
}

// Payload values from the input's tail, in turn (0.25 once it is used up).
class Values {
 public:
  Values(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  float Next() {
    if (at_ >= size_) return 0.25f;
    const uint8_t b = data_[at_++];
    if (b == 0x7f) return std::numeric_limits<float>::quiet_NaN();
    if (b == 0x80) return std::numeric_limits<float>::infinity();
    return static_cast<int8_t>(b) / 16.0f;
  }
  Tensor Fill(DType dtype, std::vector<int64_t> shape) {
    StatusOr<Tensor> made = Tensor::Zeros(DType::kF32, std::move(shape));
    if (!made.ok()) return Tensor();
    Tensor& t = *made;
    for (int64_t i = 0; i < t.num_elements(); ++i) t.f32()[i] = Next();
    return dtype == DType::kF32 ? t : t.To(dtype);
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t at_ = 0;
};

}  // namespace
}  // namespace switchyard::expert_worker

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  switchyard::fuzz::QuietLogging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace switchyard;
  using namespace switchyard::expert_worker;
  if (size < 2) return 0;
  config::SwitchyardConfig config = Config(data[0]);
  const ExpertShape shape0 = ExpertShardShape(config, 0).value();
  const ExpertShape shape1 = ExpertShardShape(config, 1).value();
  const int64_t d = shape0.d_model, f = shape0.d_ff_shard;
  // A copy: its weights and its share's buffers, about 8 bytes a value.
  const int64_t copy = 8 * shape0.num_params();
  const int64_t reserved = copy * (1 + ((data[0] >> 2) & 7)) / 2;
  config.mutable_replication()->set_reserved_bytes(reserved);
  const int layers = NumMoeLayers(config.model());
  const int experts = config.model().num_experts();
  const int shards = config.model().shards_per_expert();

  const size_t requests = std::min<size_t>(
      {size_t{data[1]}, kMaxRequests, (size - 2) / kRequestBytes});
  const uint8_t* tail = data + 2 + requests * kRequestBytes;
  Values values(tail, size - 2 - requests * kRequestBytes);
  auto gemm = NewCpuGemm(1);
  ReplicaHost host(config, "worker-fuzz", shape0, shape1, gemm.get());
  host.Start();
  const auto ask = [&](const transport::WireHeader& h, Tensor payload) {
    std::promise<Message> answer;
    host.Handle({transport::TensorMessage(h, std::move(payload)),
                 [&](Message m) { answer.set_value(std::move(m)); }});
    return answer.get_future().get();  // A second answer would throw.
  };
  for (size_t i = 0; i < requests; ++i) {
    const uint8_t* r = data + 2 + i * kRequestBytes;
    transport::WireHeader h;
    const auto kind = static_cast<MessageKind>(
        static_cast<uint8_t>(MessageKind::kReplicaWeights) + r[0] % 5);
    h.kind = static_cast<uint8_t>(kind);
    h.epoch = 4 + r[1] % 3;
    h.step = r[2] % 4;
    h.micro_batch = static_cast<int8_t>(r[3]) % 4;
    h.layer = (r[4] >> 4) % (layers + 1);
    h.expert = (r[4] & 15) % (experts + 2);
    h.shard = r[5] % (shards + 1);
    h.trainer_rank = r[5] >> 4;
    const int64_t rows = r[7] % 9;
    const ExpertShape& s = h.shard == 0 ? shape0 : shape1;
    Tensor payload;
    switch (r[6] % 8) {
      case 0:
        break;
      case 1:
        payload = values.Fill(DType::kF32, {rows, d});
        break;
      case 2:
        payload = values.Fill(DType::kF32, {rows, d + f});
        break;
      case 3: {  // The weights as a primary sends them.
        ExpertParams p = ExpertParams::Zeros(s).value();
        for (Tensor* t : {&p.w1, &p.b1, &p.w2, &p.b2}) {
          if (t->empty()) continue;
          for (int64_t k = 0; k < t->num_elements(); ++k) {
            t->f32()[k] = values.Next();
          }
        }
        // From the primary's own bf16 copies, or converted.
        if (r[7] & 1) (void)p.RefreshBf16();
        payload = WeightsForCopies(p, s.compute_dtype).value();
        break;
      }
      case 4:  // fp32 weights (the other form in a bf16 run).
        payload = values.Fill(DType::kF32, {1, s.num_params()});
        break;
      case 5:
        payload = values.Fill(DType::kBF16, {rows, d});
        break;
      case 6:
        payload = values.Fill(DType::kF32, {rows, r[7] % 40});
        break;
      default:  // Weights one value short.
        payload = values.Fill(s.compute_dtype, {1, CopyWeightsElements(s) - 1});
        break;
    }
    const int64_t sent_rows =
        payload.empty() || payload.rank() != 2 ? -1 : payload.dim(0);
    const Message answer = ask(h, std::move(payload));
    FUZZ_CHECK(answer.header.step == h.step && answer.header.kind == h.kind);
    if (answer.header.status_code != 0) {
      FUZZ_CHECK(!answer.error_text.empty());
    } else if (kind == MessageKind::kReplicaForward ||
               kind == MessageKind::kReplicaBackward) {
      // Rows in, as many rows of d_model out.
      FUZZ_CHECK(sent_rows >= 0);
      FUZZ_CHECK((answer.payload.empty() && sent_rows == 0) ||
                 (answer.payload.dtype() == DType::kF32 &&
                  answer.payload.rank() == 2 &&
                  answer.payload.dim(0) == sent_rows &&
                  answer.payload.dim(1) == d));
    } else if (kind == MessageKind::kReplicaShare) {
      FUZZ_CHECK(answer.payload.empty() ||
                 (answer.payload.dtype() == DType::kF32 &&
                  answer.payload.num_elements() == s.num_params()));
    } else {
      FUZZ_CHECK(answer.payload.empty());
    }
    FUZZ_CHECK(host.bytes() >= 0 && host.bytes() <= reserved);
  }
  // Every primary drops its copy: nothing is left held.
  for (int layer = 0; layer < layers; ++layer) {
    for (int expert = 0; expert < experts; ++expert) {
      for (int shard = 0; shard < shards; ++shard) {
        transport::WireHeader h;
        h.kind = static_cast<uint8_t>(MessageKind::kReplicaDrop);
        h.epoch = 1000;
        h.step = 1000;
        h.layer = layer;
        h.expert = expert;
        h.shard = shard;
        FUZZ_CHECK(ask(h, Tensor()).header.status_code == 0);
      }
    }
  }
  FUZZ_CHECK(host.bytes() == 0);
  host.Shutdown();
  return 0;
}
