#include "trainer/training.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <sstream>
#include <thread>
#include <vector>

#include "common/config.h"
#include "common/finite.h"
#include "common/model_shape.h"
#include "common/mutex.h"
#include "common/random.h"

namespace switchyard::trainer {

namespace {

using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start)
      .count();
}

Tensor RowsTensor(const float* data, int64_t rows, int64_t cols) {
  Tensor t = Tensor::Zeros(DType::kF32, {rows, cols}).value();
  std::memcpy(t.f32(), data, t.num_bytes());
  return t;
}

std::string Duration(double seconds) {
  const int64_t s = static_cast<int64_t>(std::llround(std::max(0.0, seconds)));
  std::ostringstream o;
  if (s >= 3600) o << s / 3600 << "h";
  if (s >= 60) o << (s % 3600) / 60 << "m";
  o << s % 60 << "s";
  return o.str();
}

// Adds b's MoE loads into a's (same layers).
void AddLoads(const LossReport& b, LossReport* a) {
  if (a->moe.empty()) {
    a->moe = b.moe;
    return;
  }
  for (size_t l = 0; l < a->moe.size(); ++l) {
    for (size_t e = 0; e < a->moe[l].load.size(); ++e)
      a->moe[l].load[e] += b.moe[l].load[e];
    a->moe[l].assignments += b.moe[l].assignments;
    a->moe[l].dropped += b.moe[l].dropped;
  }
}

// " | L0 min 3 max 40 cv 0.52 drop 0.0%" per MoE layer.
std::string LoadSummary(const LossReport& r) {
  std::ostringstream o;
  o << std::fixed;
  for (size_t l = 0; l < r.moe.size(); ++l) {
    const auto& load = r.moe[l].load;
    if (load.empty()) continue;
    double mean = 0, var = 0;
    for (int v : load) mean += v;
    mean /= load.size();
    for (int v : load) var += (v - mean) * (v - mean);
    var /= load.size();
    const double cv = mean > 0 ? std::sqrt(var) / mean : 0;
    o << " | L" << l << " min " << *std::min_element(load.begin(), load.end())
      << " max " << *std::max_element(load.begin(), load.end()) << " cv "
      << std::setprecision(2) << cv << " drop " << std::setprecision(1)
      << (r.moe[l].assignments > 0
              ? 100.0 * r.moe[l].dropped / r.moe[l].assignments
              : 0.0)
      << "%";
  }
  return o.str();
}

}  // namespace

// The model's view of the remote experts: MoeLayerClient at the current
// step, timing what the exchanges cost.
class MoeClientExperts : public MoeExperts<float> {
 public:
  MoeClientExperts(MoeLayerClient* client, int64_t d)
      : client_(client), d_(d) {}

  void Begin(int64_t step) {
    step_ = step;
    ms_ = 0;
  }
  double ms() const { return ms_; }

  Status Forward(int layer, int micro_batch, bool train, const float* x,
                 const RouterState<float>& route, float* y) override {
    const auto start = Clock::now();
    const Tensor xt = RowsTensor(x, route.tokens, d_);
    StatusOr<Tensor> out =
        train ? client_->Forward(step_, micro_batch, layer, xt, route)
              : client_->Evaluate(step_, layer, xt, route);
    ms_ += MsSince(start);
    if (!out.ok()) return out.status();
    std::memcpy(y, out->f32(), out->num_bytes());
    return OkStatus();
  }

  Status Backward(int layer, int micro_batch, int tokens, const float* dy,
                  float* dx, float* d_gate) override {
    const auto start = Clock::now();
    Tensor dxt;
    std::vector<float> dg;
    Status s = client_->Backward(step_, micro_batch, layer,
                                 RowsTensor(dy, tokens, d_), &dxt, &dg);
    ms_ += MsSince(start);
    RETURN_IF_ERROR(s);
    std::memcpy(dx, dxt.f32(), dxt.num_bytes());
    std::copy(dg.begin(), dg.end(), d_gate);
    return OkStatus();
  }

 private:
  MoeLayerClient* client_;
  const int64_t d_;
  int64_t step_ = 0;
  double ms_ = 0;
};

TrainerReplica::TrainerReplica(const config::SwitchyardConfig& config, int rank,
                               transport::DataPlane* data_plane)
    : config_(config),
      rank_(rank),
      moe_(data_plane, config, rank),
      dense_(data_plane, config, rank),
      experts_(
          std::make_unique<MoeClientExperts>(&moe_, config.model().d_model())),
      model_(config) {}

TrainerReplica::~TrainerReplica() = default;

void TrainerReplica::SetRouting(const control::RoutingTable& routing) {
  moe_.SetRouting(routing);
  dense_.SetRouting(routing);
}

StatusOr<StepReport> TrainerReplica::Step(int64_t step, const Batch& batch) {
  if (boundary_) RETURN_IF_ERROR(boundary_(step));
  last_step_ = step;
  const auto start = Clock::now();
  StepReport report;
  auto t = Clock::now();
  ASSIGN_OR_RETURN(Tensor params, dense_.Pull(step));
  report.time.pull = MsSince(t);
  ASSIGN_OR_RETURN(Tensor grads,
                   Tensor::Zeros(DType::kF32, {1, model_.num_params()}));
  const int M = config_.training().micro_batches();
  const float scale =
      1.0f / static_cast<float>(config_.cluster().trainers() * M);
  experts_->Begin(step);
  t = Clock::now();
  for (int m = 0; m < M; ++m) {
    const Batch micro = MicroBatch(batch, m, M);
    ASSIGN_OR_RETURN(LossReport r,
                     model_.TrainStep(params.f32(), micro, {step, rank_, m},
                                      scale, experts_.get(), grads.f32()));
    report.loss.loss += r.loss / M;
    report.loss.aux_loss += r.aux_loss / M;
    report.loss.z_loss += r.z_loss / M;
    report.loss.tokens += r.tokens;
    AddLoads(r, &report.loss);
  }
  report.time.experts = experts_->ms();
  report.time.dense = MsSince(t) - report.time.experts;
  RETURN_IF_ERROR(CheckDenseGradients(step, grads));
  t = Clock::now();
  RETURN_IF_ERROR(dense_.Push(step, grads));
  report.time.push = MsSince(t);
  t = Clock::now();
  RETURN_IF_ERROR(moe_.StepDone(step));
  report.time.done = MsSince(t);
  report.time.total = MsSince(start);
  return report;
}

Status TrainerReplica::CheckDenseGradients(int64_t step,
                                           const Tensor& grads) const {
  const int64_t at = FirstNonFinite(grads.f32(), grads.num_elements());
  if (at < 0) return OkStatus();
  std::string tensor = "?";
  for (const DenseTensor& t : model_.layout()) {
    if (at >= t.offset && at < t.offset + t.numel()) tensor = t.name;
  }
  return FailedPreconditionError(
      "non-finite gradient of dense tensor " + tensor + " (" +
      std::to_string(grads.f32()[at]) + ") at step " + std::to_string(step) +
      ", rank " + std::to_string(rank_) +
      ": the run has diverged and stops before this step is applied; resume "
      "from the last checkpoint with a lower training.learning_rate, or "
      "check the data");
}

StatusOr<LossReport> TrainerReplica::Evaluate(int64_t step, const Batch& batch,
                                              std::vector<float>* logits) {
  ASSIGN_OR_RETURN(Tensor params, dense_.Pull(step));
  experts_->Begin(step);
  return model_.Evaluate(params.f32(), batch, experts_.get(), logits);
}

StatusOr<std::string> TrainerReplica::Sample(int64_t step,
                                             const std::string& prompt,
                                             int length) {
  constexpr uint64_t kTagSample = 31;
  const int L = config_.model().seq_len(), V = config_.model().vocab_size();
  ASSIGN_OR_RETURN(Tensor params, dense_.Pull(step));
  experts_->Begin(step);
  std::string text = prompt.empty() ? std::string("\n") : prompt;
  std::string generated;
  for (int i = 0; i < length; ++i) {
    const size_t n = std::min<size_t>(text.size(), L);
    Batch b;
    b.batch_size = 1;
    b.seq_len = static_cast<int>(n);
    for (size_t j = text.size() - n; j < text.size(); ++j) {
      b.inputs.push_back(static_cast<unsigned char>(text[j]) % V);
    }
    b.targets = b.inputs;
    std::vector<float> logits;
    ASSIGN_OR_RETURN(LossReport unused,
                     model_.Evaluate(params.f32(), b, experts_.get(), &logits));
    (void)unused;
    // Sample from softmax(logits / 0.8) of the last position.
    const float* last = logits.data() + (n - 1) * V;
    const float m = *std::max_element(last, last + V);
    std::vector<double> p(V);
    double sum = 0;
    for (int v = 0; v < V; ++v) sum += (p[v] = std::exp((last[v] - m) / 0.8));
    double u = RandomUniform(config_.training().seed(),
                             {kTagSample, static_cast<uint64_t>(step),
                              static_cast<uint64_t>(i)}) *
               sum;
    int pick = V - 1;
    for (int v = 0; v < V; ++v) {
      if ((u -= p[v]) <= 0) {
        pick = v;
        break;
      }
    }
    text += static_cast<char>(pick);
    generated += static_cast<char>(pick);
  }
  return generated;
}

StatusOr<TextLoss> EvaluateText(TrainerReplica* replica, int64_t step,
                                const std::string& text, int batch_size,
                                int64_t max_windows) {
  const auto& m = replica->config().model();
  const int L = m.seq_len(), V = m.vocab_size();
  TextLoss result;
  result.windows =
      text.size() > 0 ? static_cast<int64_t>(text.size() - 1) / L : 0;
  if (max_windows > 0) result.windows = std::min(result.windows, max_windows);
  if (result.windows == 0) {
    return InvalidArgumentError(
        "the text holds " + std::to_string(text.size()) +
        " bytes: fewer than one window of model.seq_len + 1 = " +
        std::to_string(L + 1));
  }
  if (batch_size < 1) {
    return InvalidArgumentError("batch size " + std::to_string(batch_size) +
                                " is below 1");
  }
  double total = 0;
  for (int64_t first = 0; first < result.windows; first += batch_size) {
    Batch b;
    b.batch_size =
        static_cast<int>(std::min<int64_t>(batch_size, result.windows - first));
    b.seq_len = L;
    for (int64_t w = first; w < first + b.batch_size; ++w) {
      for (int i = 0; i < L; ++i) {
        const size_t at = static_cast<size_t>(w) * L + i;
        b.inputs.push_back(static_cast<unsigned char>(text[at]) % V);
        b.targets.push_back(static_cast<unsigned char>(text[at + 1]) % V);
      }
    }
    ASSIGN_OR_RETURN(LossReport r, replica->Evaluate(step, b, nullptr));
    const int64_t tokens = static_cast<int64_t>(b.batch_size) * L;
    total += r.loss * static_cast<double>(tokens);
    result.tokens += tokens;
  }
  result.loss = total / static_cast<double>(result.tokens);
  return result;
}

namespace {

// Runs fn(i) for every i in [0, n) at once, index 0 on the calling thread
// and each other on a thread of its own, kept for the whole run (each
// first runs `init`: per-thread settings such as the GEMM thread count).
// The single-process reference drives its ranks this way, concurrently, as
// separate trainer processes run: the workers compute a layer's experts
// once every rank's requests are in, so ranks run in turn would wait on
// each other. Run returns when every fn(i) has; each of those ends by the
// deadlines of its own requests.
class RankThreads {
 public:
  RankThreads(int n, const std::function<void()>& init) {
    for (int i = 1; i < n; ++i) {
      threads_.emplace_back([this, i, init] {
        init();
        Loop(i);
      });
    }
  }
  ~RankThreads() {
    {
      MutexLock lock(&mu_);
      stop_ = true;
    }
    cv_.NotifyAll();
    for (std::thread& t : threads_) t.join();
  }

  void Run(const std::function<void(int)>& fn) EXCLUDES(mu_) {
    {
      MutexLock lock(&mu_);
      fn_ = &fn;
      ++round_;
      running_ = static_cast<int>(threads_.size());
    }
    cv_.NotifyAll();
    fn(0);
    MutexLock lock(&mu_);
    while (running_ > 0) cv_.Wait(&mu_);
    fn_ = nullptr;
  }

 private:
  void Loop(int i) EXCLUDES(mu_) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* fn = nullptr;
      {
        MutexLock lock(&mu_);
        while (!stop_ && round_ == seen) cv_.Wait(&mu_);
        if (stop_) return;
        seen = round_;
        fn = fn_;
      }
      (*fn)(i);
      {
        MutexLock lock(&mu_);
        --running_;
      }
      cv_.NotifyAll();
    }
  }

  Mutex mu_;
  CondVar cv_;
  const std::function<void(int)>* fn_ GUARDED_BY(mu_) = nullptr;
  uint64_t round_ GUARDED_BY(mu_) = 0;
  int running_ GUARDED_BY(mu_) = 0;
  bool stop_ GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace

StatusOr<TrainingResult> RunTraining(
    const config::SwitchyardConfig& config, const ByteCorpus& corpus,
    const TrainingOptions& options, std::vector<TrainerReplica*> replicas,
    int64_t first_step, const std::atomic<bool>* stopping, std::ostream& out) {
  const auto& tr = config.training();
  const int B = tr.batch_size(), L = config.model().seq_len();
  const bool print = !replicas.empty() && replicas.front()->rank() == 0;
  TrainerReplica* lead = replicas.front();
  TrainingResult result;
  auto validate = [&](int64_t version) -> StatusOr<double> {
    double total = 0;
    for (int i = 0; i < options.eval_batches; ++i) {
      ASSIGN_OR_RETURN(
          LossReport r,
          lead->Evaluate(version, corpus.ValidationBatch(i, B, L), nullptr));
      total += r.loss;
    }
    return total / std::max(1, options.eval_batches);
  };
  if (print) {
    out << "training " << tr.steps()
        << " steps: " << config.cluster().trainers() << " trainers x " << B
        << " sequences x " << L << " bytes, " << config.model().num_layers()
        << " layers (" << NumMoeLayers(config.model()) << " MoE, "
        << config.model().num_experts() << " experts, top-"
        << config.model().top_k() << "), " << corpus.train_bytes()
        << " training bytes from " << corpus.num_files() << " files"
        << std::endl;
  }
  // Where this run ends: training.steps, or earlier at stop_at_step.
  const int64_t end_step = RunEndStep(tr);
  if (first_step >= end_step) {
    if (print) {
      out << "nothing to train: the run resumes at step " << first_step
          << " of " << tr.steps() << std::endl;
    }
    TrainingResult done;
    done.steps = first_step;
    return done;
  }
  if (print && first_step > 0) {
    out << "resuming at step " << first_step << " from the committed checkpoint"
        << std::endl;
  }
  const int threads = tr.threads();
  RankThreads ranks(static_cast<int>(replicas.size()),
                    [threads] { SetMatMulThreads(threads); });
  const auto start = Clock::now();
  int64_t tokens = 0;
  LossReport window;  // Since the last progress line.
  int window_steps = 0;
  int last_window = 0;  // Steps in the last closed window.
  const int64_t run_steps = std::max<int64_t>(1, end_step - first_step);
  for (int64_t step = first_step; step < end_step; ++step) {
    if (stopping != nullptr && *stopping) {
      return CancelledError("stopped at step " + std::to_string(step));
    }
    double loss = 0;
    std::vector<Batch> batches;
    for (TrainerReplica* r : replicas) {
      batches.push_back(corpus.TrainBatch(tr.seed(), step, r->rank(), B, L));
    }
    std::vector<StatusOr<StepReport>> reports(replicas.size(),
                                              InternalError("not run"));
    ranks.Run([&](int i) { reports[i] = replicas[i]->Step(step, batches[i]); });
    // A rank that stopped (a non-finite loss, say) leaves the others
    // waiting for its requests until their deadline: its error is the
    // cause, and goes first.
    for (size_t i = 0; i < replicas.size(); ++i) {
      const Status& s = reports[i].status();
      if (!s.ok() && s.code() != StatusCode::kDeadlineExceeded &&
          s.code() != StatusCode::kCancelled) {
        return s.WithContext("step " + std::to_string(step) + " of rank " +
                             std::to_string(replicas[i]->rank()));
      }
    }
    for (size_t i = 0; i < replicas.size(); ++i) {
      TrainerReplica* r = replicas[i];
      StatusOr<StepReport>& report = reports[i];
      if (!report.ok()) {
        return report.status().WithContext("step " + std::to_string(step) +
                                           " of rank " +
                                           std::to_string(r->rank()));
      }
      loss += report->loss.loss / replicas.size();
      // Steps are synchronous: every rank trains as many tokens as this one,
      // so the cluster's rate is this rank's times trainers per replica.
      tokens += report->loss.tokens * config.cluster().trainers() /
                static_cast<int64_t>(replicas.size());
      AddLoads(report->loss, &window);
      for (auto [sum, v] :
           {std::pair{&result.mean_time.pull, report->time.pull},
            {&result.mean_time.dense, report->time.dense},
            {&result.mean_time.experts, report->time.experts},
            {&result.mean_time.push, report->time.push},
            {&result.mean_time.done, report->time.done},
            {&result.mean_time.total, report->time.total}}) {
        *sum += v / (run_steps * replicas.size());
      }
    }
    window.loss += loss;
    ++window_steps;
    if (step == first_step) result.first_loss = loss;
    result.steps = step + 1;
    const bool last = step + 1 == end_step;
    if (last || (step + 1) % tr.log_every() == 0) {
      // The end of a progress window (log_every steps).
      result.last_loss = window.loss / window_steps;
      last_window = window_steps;
    }
    if (print && (last || (step + 1) % tr.log_every() == 0)) {
      const double seconds = MsSince(start) / 1000;
      const double rate = tokens / std::max(seconds, 1e-9);
      out << "step " << step + 1 << "/" << tr.steps() << std::fixed
          << std::setprecision(3) << " loss " << window.loss / window_steps
          << std::setprecision(0) << " " << rate << " tok/s"
          << " ETA "
          << Duration(seconds / (step + 1 - first_step) * (end_step - step - 1))
          << LoadSummary(window) << std::endl;
    }
    if (last || (step + 1) % tr.log_every() == 0) {
      window = LossReport();
      window_steps = 0;
    }
    if (print && tr.eval_every() > 0 && (step + 1) % tr.eval_every() == 0 &&
        !last) {
      ASSIGN_OR_RETURN(double v, validate(step + 1));
      out << "step " << step + 1 << " validation loss " << std::fixed
          << std::setprecision(3) << v << std::endl;
    }
  }
  const double seconds = MsSince(start) / 1000;
  result.tokens_per_second = tokens / std::max(seconds, 1e-9);
  if (!print) return result;
  ASSIGN_OR_RETURN(result.validation_loss, validate(end_step));
  const StepTimings& t = result.mean_time;
  out << std::fixed << std::setprecision(3) << "done: " << end_step - first_step
      << " steps in " << Duration(seconds) << ", loss " << result.first_loss
      << " (step " << first_step + 1 << ") -> " << result.last_loss << " (last "
      << last_window << " steps), validation loss " << result.validation_loss
      << std::setprecision(0) << ", " << result.tokens_per_second << " tok/s"
      << std::setprecision(1) << "\nper step (ms): pull " << t.pull
      << ", dense compute " << t.dense << ", experts " << t.experts << ", push "
      << t.push << ", step done " << t.done << ", total " << t.total
      << std::endl;
  if (options.sample_bytes > 0) {
    ASSIGN_OR_RETURN(
        std::string sample,
        lead->Sample(end_step, options.sample_prompt, options.sample_bytes));
    out << "sample: " << options.sample_prompt << sample << std::endl;
  }
  if (options.source_report && NumMoeLayers(config.model()) > 0 &&
      corpus.sources().size() > 1) {
    out << "experts by source (first MoE layer, share of routed tokens):"
        << std::endl;
    for (size_t s = 0; s < corpus.sources().size(); ++s) {
      const Batch b = corpus.SourceBatch(static_cast<int>(s), B, L);
      if (b.batch_size == 0) continue;
      ASSIGN_OR_RETURN(LossReport r, lead->Evaluate(end_step, b, nullptr));
      const auto& load = r.moe.front().load;
      std::vector<int> order(load.size());
      for (size_t e = 0; e < order.size(); ++e) order[e] = static_cast<int>(e);
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int c) { return load[a] > load[c]; });
      int total = 0;
      for (int v : load) total += v;
      out << "  " << std::left << std::setw(24) << corpus.sources()[s].name
          << std::right;
      for (size_t i = 0; i < std::min<size_t>(3, order.size()); ++i) {
        out << " E" << order[i] << " " << std::setprecision(0)
            << (total > 0 ? 100.0 * load[order[i]] / total : 0.0) << "%";
      }
      out << std::endl;
    }
  }
  return result;
}

}  // namespace switchyard::trainer
