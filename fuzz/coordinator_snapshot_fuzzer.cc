// Fuzzes the coordinator's restart from its persisted state
// (coordinator/coordinator_service.cc, Start): a CoordinatorSnapshot parsed
// from the bytes stored under "coordinator/snapshot", ClusterState::Restore,
// the resume step, then what follows a restart: every known member
// re-registers and heartbeats, leases expire, and the state is reported,
// routed and persisted again.
//
// Input: byte 0 picks the configuration the coordinator runs with: even,
// examples/tiny.yaml's (the snapshot's config replaced by it, so that the
// model check passes and the rest of the snapshot is exercised); odd, the
// snapshot's own config when it validates (and has at most 4096 shards, to
// keep each run short). The rest is the stored snapshot. Checks: a state
// restored from a snapshot it wrote itself restores again.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/config.h"
#include "common/model_shape.h"
#include "coordinator/cluster_state.h"
#include "fuzz/fuzz_support.h"

namespace {

using switchyard::coordinator::Clock;
using switchyard::coordinator::ClusterState;

// examples/tiny.yaml, two trainers, one replica.
constexpr char kTinyConfig[] = R"(cluster:
  workers: 2
  trainers: 2
model:
  num_layers: 4
  d_model: 64
  d_ff: 256
  num_heads: 4
  seq_len: 64
  moe_every: 2
  num_experts: 8
  top_k: 1
training:
  steps: 200
  batch_size: 8
  learning_rate: 0.003
checkpoint:
  every: 10
  replicas: 1
)";

const switchyard::SwitchyardConfig& TinyConfig() {
  static const auto* config = new switchyard::SwitchyardConfig(
      switchyard::ParseConfig(kTinyConfig, "tiny", {}).value().config);
  return *config;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  switchyard::fuzz::QuietLogging();
  TinyConfig();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace switchyard;
  if (size < 1) return 0;
  control::CoordinatorSnapshot snapshot;
  if (!snapshot.ParseFromArray(data + 1, static_cast<int>(size - 1))) {
    return 0;  // Start refuses it: "does not parse".
  }
  SwitchyardConfig config;
  if (data[0] % 2 == 0) {
    config = TinyConfig();
    *snapshot.mutable_config() = config;
  } else {
    config = snapshot.config();
    if (!ValidateConfig(config, {}).ok()) return 0;
    const auto& m = config.model();
    if (int64_t{NumMoeLayers(m)} * m.num_experts() * m.shards_per_expert() +
            m.dense_shards() >
        4096) {
      return 0;
    }
  }
  // A steady clock's point far from its epoch; no clock is read.
  Clock::time_point now = Clock::time_point() + std::chrono::hours(1000);
  auto restored = coordinator::ClusterState::Restore(config, snapshot, now);
  if (!restored.ok()) return 0;
  ClusterState& state = *restored;
  // A restart keeps the epoch: the members' routing table stays in force.
  FUZZ_CHECK(state.epoch() == snapshot.epoch());
  if (!state.ChooseResumeStep(false, 0).ok()) return 0;
  (void)state.Routing();
  (void)state.Report(now);
  {
    // What a restart persists restores again, at the same epoch.
    const control::CoordinatorSnapshot again = state.Snapshot();
    auto twice = ClusterState::Restore(config, again, now);
    FUZZ_CHECK(twice.ok());
    FUZZ_CHECK(twice->epoch() == state.epoch());
  }
  // The members come back: each re-registers (as the process it was) and
  // heartbeats; the rest of a lease later, the silent ones are dead.
  int registered = 0;
  for (const control::MemberRecord& record : snapshot.members()) {
    if (++registered > 16) break;
    control::RegisterRequest request = record.registration();
    request.set_previous_incarnation(record.incarnation());
    auto response = state.Register(request, now);
    if (!response.ok()) continue;
    control::Heartbeat beat;
    beat.set_name(request.name());
    beat.set_incarnation(response->incarnation());
    (void)state.Heartbeat(beat, now);
  }
  now += std::chrono::milliseconds(3 * int64_t{config.cluster().lease_ms()});
  state.Tick(now);
  (void)state.Routing();
  (void)state.Report(now);
  const control::CoordinatorSnapshot after = state.Snapshot();
  FUZZ_CHECK(ClusterState::Restore(config, after, now).ok());
  return 0;
}
