// Helpers shared by the WorkerService tests (worker_service*_test.cc): a
// small test model and its routing table, requests as trainers send them,
// whole steps fed to a worker, and store wrappers that inject faults (a full
// disk) or hold reads and writes until a test lets them go. The tests live
// in this namespace too (each in an anonymous one inside it).
#ifndef SWITCHYARD_TESTS_EXPERT_WORKER_WORKER_TEST_UTIL_H_
#define SWITCHYARD_TESTS_EXPERT_WORKER_WORKER_TEST_UTIL_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/mutex.h"
#include "config.pb.h"
#include "control.pb.h"
#include "expert_worker/worker_service.h"
#include "storage/checkpoint_store.h"
#include "transport/data_plane.h"

namespace switchyard::expert_worker::worker_testing {

using transport::Message;
using transport::MessageKind;
using Ms = std::chrono::milliseconds;

inline constexpr uint64_t kEpoch = 5;
inline constexpr int kSteps = 3, kRanks = 2, kMicroBatches = 2;

// Two layers (layer 1 is MoE) of 2 experts of 2 shards, d_model 8, d_ff 16,
// 2 trainers, one thread.
config::SwitchyardConfig TestConfig(const std::string& optimizer,
                                    int dense_shards = 2,
                                    const std::string& dtype = "fp32");

// Every shard of TestConfig on the one worker "w", at `epoch`.
control::RoutingTable Routing(uint64_t epoch, int dense_shards = 2);

// An expert request of trainer `rank` for expert `expert`, shard `shard`:
// (tokens, 8) values that depend only on the arguments; `tokens` -1 takes a
// count of 0 to 5 that (step, rank, mb, expert) chooses. kStepDone carries
// no payload.
Message Request(MessageKind kind, int step, int rank, int mb, int expert,
                int shard, uint64_t epoch = kEpoch, int tokens = -1);

// A dense pull, or a dense push with a gradient for the whole of `shard`.
Message DenseRequest(MessageKind kind, int step, int rank, int shard,
                     uint64_t epoch = kEpoch);

// One trainer's requests for one step, in the order a trainer sends them:
// pull the dense tables, the expert traffic, push dense gradients, StepDone.
std::vector<Message> TrainerStep(int step, int rank);

// Collects replies; Wait() returns the failures. The replies it makes share
// its state, so a reply that comes after a failed Wait (and the end of the
// test's scope) touches nothing freed.
class Replies {
 public:
  transport::Reply Make();
  std::vector<std::string> Wait();

 private:
  struct State {
    Mutex mu;
    CondVar cv;
    int expected GUARDED_BY(mu) = 0;
    int received GUARDED_BY(mu) = 0;
    std::vector<std::string> errors GUARDED_BY(mu);
  };
  const std::shared_ptr<State> state_ = std::make_shared<State>();
};

// Feeds every trainer's steps, interleaving the two trainers' request streams
// at random (seed) or, with seed 0, trainer 1 first whenever it may go. As
// with real trainers, a trainer runs at most one step ahead of the slowest
// one (it cannot send step t + 2 before its step t + 1 forwards are
// answered, which needs update t), so requests for the next step do arrive
// before the update and must wait for it.
std::string RunInterleaved(const std::string& optimizer, uint32_t seed,
                           const std::string& dtype = "fp32");

// Sends one request and waits for its answer.
Message Ask(WorkerService* worker, Message m);

// Sends the i-th messages of every rank's list at once, as concurrent
// trainers do (a shard answers a forward once every rank's is in), and
// waits for their answers, position by position; the lists may differ in
// length. Returns the answers by rank and position.
std::vector<std::vector<Message>> AskTogether(
    WorkerService* worker, std::vector<std::vector<Message>> per_rank);
// The same over several workers: each message with the worker it goes to.
using Addressed = std::pair<WorkerService*, Message>;
std::vector<std::vector<Message>> AskTogether(
    std::vector<std::vector<Addressed>> per_rank);
// Every rank's requests of `step` (TrainerStep), at `epoch`, all answered
// OK (AskTogether).
void StepTogether(WorkerService* worker, int step, uint64_t epoch = kEpoch);

// An empty directory of this test process, named after `tag`.
std::string FreshDir(const std::string& tag);

// The value of a process-wide counter (common/metrics.h).
uint64_t CounterValue(const std::string& name);

// Trains `worker` through steps [first, end) with every rank's requests;
// after_step(step) follows each step.
void TrainSteps(
    WorkerService* worker, int first, int end,
    const std::function<void(int)>& after_step = [](int) {});

using DigestsByShard = std::map<std::string, std::string>;

// The shard digests of a worker without checkpoints after each of `steps`
// steps of `config` (index: steps done).
std::vector<DigestsByShard> DigestsByStep(
    const config::SwitchyardConfig& config, int steps);

// What a worker reported of its checkpoints: digests by step and shard.
struct Reported {
  std::mutex mu;
  std::map<int64_t, DigestsByShard> digests;  // GUARDED_BY(mu)

  // A copy of what was reported so far.
  std::map<int64_t, DigestsByShard> Get();

  WorkerService::CheckpointReporter Reporter();
};

// Every reported checkpoint holds the digests of its step in `expected`.
void ExpectEachMatches(const std::map<int64_t, DigestsByShard>& reported,
                       const std::vector<DigestsByShard>& expected);

// The fault-injection seam: a real store whose writes fail with
// RESOURCE_EXHAUSTED (a full disk) while `full` is set.
class FullDiskStore : public storage::CheckpointStore {
 public:
  explicit FullDiskStore(std::unique_ptr<storage::CheckpointStore> inner)
      : inner_(std::move(inner)) {}
  std::atomic<bool> full{false};

  StatusOr<checkpoint::ShardManifest> WriteShard(
      const storage::ShardSnapshot& s) override;
  StatusOr<storage::ShardSnapshot> ReadShard(int64_t step,
                                             const std::string& shard) override;
  Status ReadShardInto(int64_t step, const std::string& shard,
                       storage::ShardSnapshot* into) override;
  StatusOr<std::vector<checkpoint::ShardManifest>> Manifests(
      std::optional<int64_t> step) override;
  Status DropSteps(int64_t first, int64_t end) override;
  Status VerifyFiles() override;

 private:
  std::unique_ptr<storage::CheckpointStore> inner_;
};

// A store whose reads wait until `open` is set: a restore that takes as long
// as the test likes.
class GatedReadStore : public FullDiskStore {
 public:
  using FullDiskStore::FullDiskStore;
  std::atomic<bool> open{false};
  std::atomic<int> waiting{0};

  Status ReadShardInto(int64_t step, const std::string& shard,
                       storage::ShardSnapshot* into) override;
};

// A store whose writes wait until `open` is set: a checkpoint write that
// takes as long as the test likes.
class GatedWriteStore : public FullDiskStore {
 public:
  using FullDiskStore::FullDiskStore;
  std::atomic<bool> open{false};
  std::atomic<int> writing{0};  // Writes begun.

  // Whether a write has begun within 30 s.
  bool WaitForAWrite() const;

  StatusOr<checkpoint::ShardManifest> WriteShard(
      const storage::ShardSnapshot& s) override;
};

}  // namespace switchyard::expert_worker::worker_testing

#endif  // SWITCHYARD_TESTS_EXPERT_WORKER_WORKER_TEST_UTIL_H_
