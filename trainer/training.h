// The training loop of data-parallel trainers (DESIGN.md, "One synchronous
// training step").
//
// A TrainerReplica is one rank: for step t it pulls the dense parameters of
// version t, runs forward and backward over its micro-batches (experts on
// the workers through MoeLayerClient, dense gradients summed over
// micro-batches in order), pushes its dense gradient and sends StepDone(t).
// The loss of every micro-batch is scaled by 1 / (trainers * micro-batches)
// so that the workers' rank-ordered sums are gradients of the mean loss.
//
// RunTraining drives replicas step by step: one replica in a `switchyard
// train` process, or every rank at once (a thread each) in the
// single-process reference (reference/reference.h), where the workers' code
// runs in the same process behind an in-process data plane. Both print the same
// progress lines and summary.
//
// Thread-compatible: one thread drives a replica.
#ifndef SWITCHYARD_TRAINER_TRAINING_H_
#define SWITCHYARD_TRAINER_TRAINING_H_

#include <atomic>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "common/status.h"
#include "config.pb.h"
#include "control.pb.h"
#include "trainer/data.h"
#include "trainer/dense_client.h"
#include "trainer/model.h"
#include "trainer/moe_client.h"
#include "transport/data_plane.h"

namespace switchyard::trainer {

// Where a step's wall time went, in milliseconds.
struct StepTimings {
  double pull = 0;     // dense parameters
  double dense = 0;    // the trainer's own compute (attention, routers ...)
  double experts = 0;  // MoE exchanges: expert compute, transfer, waiting
  double push = 0;     // dense gradients
  double done = 0;     // StepDone (waits for nothing; the next pull waits)
  double total = 0;
};

struct StepReport {
  LossReport loss;  // Mean over micro-batches; MoE loads summed.
  StepTimings time;
};

class MoeClientExperts;

class TrainerReplica {
 public:
  TrainerReplica(const config::SwitchyardConfig& config, int rank,
                 transport::DataPlane* data_plane);
  ~TrainerReplica();

  int rank() const { return rank_; }
  const config::SwitchyardConfig& config() const { return config_; }
  void SetRouting(const control::RoutingTable& routing);
  // Called at the start of every Step(step), at the step boundary, before
  // anything of the step is sent: it may wait there (a pause for a live
  // move) and change the routing; an error fails the step with nothing
  // of it done.
  void SetBoundary(std::function<Status(int64_t step)> boundary) {
    boundary_ = std::move(boundary);
  }
  // The last step begun (-1: none yet; any thread may ask).
  int64_t last_step() const { return last_step_.load(); }

  // Step `step` on this rank's batch.
  StatusOr<StepReport> Step(int64_t step, const Batch& batch);
  // The loss of `batch` with the parameters after `step` updates (nothing is
  // trained; logits (B * L, V) when not null).
  StatusOr<LossReport> Evaluate(int64_t step, const Batch& batch,
                                std::vector<float>* logits);
  // `length` bytes continuing `prompt`, sampled at temperature 0.8 with
  // random numbers from (seed, position): deterministic.
  StatusOr<std::string> Sample(int64_t step, const std::string& prompt,
                               int length);

 private:
  // OK when every dense gradient is finite; else an error naming the tensor,
  // the step and this rank.
  Status CheckDenseGradients(int64_t step, const Tensor& grads) const;
  const config::SwitchyardConfig config_;
  const int rank_;
  MoeLayerClient moe_;
  DenseTableClient dense_;
  std::unique_ptr<MoeClientExperts> experts_;
  Transformer<float> model_;
  std::atomic<int64_t> last_step_{-1};
  std::function<Status(int64_t step)> boundary_;
};

struct TrainingOptions {
  // Text for the sample at the end; empty: no sample.
  std::string sample_prompt = "The ";
  int sample_bytes = 160;
  // Validation batches per evaluation.
  int eval_batches = 4;
  // Print which experts each corpus source routes to at the end.
  bool source_report = true;
};

// The model's loss on a text: windows of seq_len + 1 bytes at offsets 0,
// seq_len, 2 * seq_len, ... (inputs the first seq_len bytes, targets the
// next seq_len, each byte mod vocab_size), at most max_windows of them (0:
// every whole window), evaluated batch_size windows per forward pass (the
// last pass may hold fewer). loss is the mean cross-entropy per token.
struct TextLoss {
  double loss = 0;
  int64_t windows = 0;
  int64_t tokens = 0;
};
StatusOr<TextLoss> EvaluateText(TrainerReplica* replica, int64_t step,
                                const std::string& text, int batch_size,
                                int64_t max_windows);

// tokens_per_second counts the whole cluster's tokens (every rank's).
struct TrainingResult {
  int64_t steps = 0;
  // The first step's loss; the mean loss of the last progress window (up
  // to log_every steps).
  double first_loss = 0, last_loss = 0;
  double validation_loss = 0;  // At the end; 0 when not evaluated.
  double tokens_per_second = 0;
  StepTimings mean_time;  // Per step, over the replicas in this process.
};

// Runs steps [first_step, training.steps) for `replicas` (ascending
// ranks), printing progress to `out` when the first replica is rank 0.
// first_step > 0 resumes a run from a checkpoint: batches depend only on
// (seed, step, rank), so the data order is the uninterrupted run's. Returns
// early (CANCELLED) when `stopping` turns true.
StatusOr<TrainingResult> RunTraining(
    const config::SwitchyardConfig& config, const ByteCorpus& corpus,
    const TrainingOptions& options, std::vector<TrainerReplica*> replicas,
    int64_t first_step, const std::atomic<bool>* stopping, std::ostream& out);

}  // namespace switchyard::trainer

#endif  // SWITCHYARD_TRAINER_TRAINING_H_
