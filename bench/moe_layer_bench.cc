// bench/moe_layer: one MoE layer, forward and backward, end to end through
// the real system: d_model 1024, d_ff 4096, 8 experts, top-1, dropless,
// 1024 tokens per trainer per step; 2 trainers and 2 workers, each its own
// process (this binary re-executed in a role), over the UCX data plane on
// loopback. A step is: route, Forward to every expert shard, Backward,
// StepDone (the workers then compute the weight gradients and apply AdamW).
//
// Prints the total tokens/s over both trainers and the expert GFLOP/s it
// implies (12 * d_model * d_ff * k FLOPs per token: forward, input gradient
// and weight gradient, two GEMMs each), against the same GEMMs run with raw
// BLAS in this process on the same shapes and thread count (2 threads, the
// machine's 2 cores). Target: >= 5,000 tokens/s (issue 4). Each trainer also
// prints where its step time goes (forward, backward, StepDone).
//
// Runs with fp32 and then bf16 expert compute (bf16 GEMM operands, fp32
// accumulation and master weights, bf16 tokens on the wire), or only the
// one --dtype names. Each worker prints where its compute thread's time
// went per step (GEMM, activation, optimizer, the rest of serving, and
// waiting for requests); the step time the busiest worker does not account
// for is transport and the trainers' own work. --skew F routes a fraction
// F of every trainer's tokens to expert 0 (a hot expert; the skew
// case is 0.5 of 8 experts); the per-worker token load max/mean is printed.
// kUsage below lists the flags.
//
// (internal roles: --role worker|trainer ...)
#include <cblas.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_data_plane.h"
#include "common/bf16.h"
#include "common/files.h"
#include "common/metrics.h"
#include "common/random.h"
#include "expert_worker/cpu/blas_kernels.h"
#include "expert_worker/gemm.h"
#include "expert_worker/worker_service.h"
#include "trainer/moe_client.h"
#include "trainer/router.h"
#include "transport/data_plane.h"

namespace switchyard {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr int kD = 1024, kF = 4096;
constexpr int kWorkers = 2, kTrainers = 2, kWarmup = 2;

constexpr char kUsage[] =
    "usage: moe_layer_bench [--steps N] [--micro-batches M] "
    "[--dtype fp32|bf16]\n"
    "                       [--tokens T] [--experts E] [--top-k K] "
    "[--skew F]\n"
    "                       [--replicate]\n"
    "  One MoE layer (d_model 1024, d_ff 4096) trained end to end: 2 trainer\n"
    "  and 2 worker processes over UCX on loopback, against raw GEMMs.\n"
    "  --steps N          measured steps (after 2 warm-up steps; default 10)\n"
    "  --micro-batches M  micro-batches per step (default 1)\n"
    "  --dtype D          fp32 or bf16 experts (default: both, in turn)\n"
    "  --tokens T         tokens per trainer per micro-batch (default 1024)\n"
    "  --experts E        experts (default 8; placed on the 2 workers in\n"
    "                     halves)\n"
    "  --top-k K          experts per token (default 1)\n"
    "  --skew F           route the share F (0..1) of tokens to expert 0\n"
    "                     first (default 0: random, near balanced)\n"
    "  --replicate        hot-expert replication (docs/replication.md): a\n"
    "                     plan every step (replication.window_steps 1,\n"
    "                     hot_load 1.5), chunks on the other worker\n";

// The layer's shape (flags).
struct Shape {
  int tokens = 1024, experts = 8, top_k = 1;
  double skew = 0;
  bool replicate = false;
};
Shape g_shape;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Expert compute and wire dtype: "fp32" or "bf16" (--dtype).
std::string g_dtype = "fp32";

config::SwitchyardConfig BenchConfig(int threads) {
  config::SwitchyardConfig c;
  c.mutable_training()->set_compute_dtype(g_dtype);
  c.mutable_training()->set_wire_dtype(g_dtype);
  auto* m = c.mutable_model();
  m->set_num_layers(1);
  m->set_moe_every(1);
  m->set_d_model(kD);
  m->set_d_ff(kF);
  m->set_num_experts(g_shape.experts);
  m->set_top_k(g_shape.top_k);
  m->set_capacity_factor(0);
  c.mutable_cluster()->set_trainers(kTrainers);
  c.mutable_training()->set_threads(threads);
  c.mutable_training()->set_steps(1 << 30);
  if (g_shape.replicate) {
    auto* r = c.mutable_replication();
    r->set_enabled(true);
    r->set_window_steps(1);
    r->set_hot_load(1.5);
    r->set_cool_load(1.0);
    r->set_max_replicas(kWorkers);
  }
  return c;
}

// Waits for `path` to exist (written whole by rename); false after 60 s.
bool WaitForFile(const std::string& path) {
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (!fs::exists(path)) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path + ".tmp") << text;
  fs::rename(path + ".tmp", path);
}

int RunWorker(const std::string& dir, int index) {
  const auto config = BenchConfig(/*threads=*/1);
  const std::string name = "w" + std::to_string(index);
  expert_worker::WorkerService service(config, name);
  auto plane = transport::NewUcxDataPlane(BenchDataPlaneOptions());
  if (!service.Start().ok() || !plane.ok() ||
      !(*plane)
           ->Start([&service](transport::Message m, transport::Reply r) {
             service.Handle(std::move(m), std::move(r));
           })
           .ok()) {
    std::fprintf(stderr, "worker %d: cannot start\n", index);
    return 1;
  }
  service.SetPeerPlane(plane->get());  // Chunks of replicated shards.
  WriteFile(dir + "/" + name + ".addr", (*plane)->address());
  if (!WaitForFile(dir + "/routing.pb")) return 1;
  control::RoutingTable routing;
  routing.ParseFromString(ReadFileToString(dir + "/routing.pb").value());
  if (!service.ApplyRouting(routing).ok()) return 1;
  WriteFile(dir + "/" + name + ".ready", "");
  // The compute thread's time, between the end of the warm-up (trainer 0
  // writes "measure") and the trainers' end ("stop").
  auto& registry = MetricsRegistry::Global();
  const char* kParts[] = {"gemm", "activation", "optimizer", "busy", "idle"};
  auto read = [&] {
    std::vector<double> v;
    for (const char* part : kParts) {
      v.push_back(1e-3 * static_cast<double>(
                             registry
                                 .GetCounter(std::string("switchyard_worker_") +
                                             part + "_microseconds_total")
                                 ->value()));
    }
    return v;
  };
  // The rows this worker computed: its shards' forward rows, less those
  // its copies elsewhere computed, plus those it computed as a copy (the
  // counts its heartbeats report, taken here: no coordinator runs).
  Counter* tokens = registry.GetCounter("switchyard_worker_tokens_total");
  const auto take_copy_rows = [&] {
    control::Heartbeat beat;
    service.AnnotateReplication(&beat);
    return static_cast<double>(beat.copy_tokens()) -
           static_cast<double>(beat.offloaded_tokens());
  };
  std::vector<double> from;
  double tokens_from = 0;
  // Serve until told to stop, or until the parent is gone.
  while (!fs::exists(dir + "/stop") && ::getppid() != 1) {
    if (from.empty() && fs::exists(dir + "/measure")) {
      from = read();
      tokens_from = static_cast<double>(tokens->value());
      take_copy_rows();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (!from.empty()) {
    const std::vector<double> to = read();
    const double rows =
        static_cast<double>(tokens->value()) - tokens_from + take_copy_rows();
    const int steps = std::stoi(ReadFileToString(dir + "/steps").value());
    std::vector<double> ms;
    for (size_t i = 0; i < to.size(); ++i)
      ms.push_back((to[i] - from[i]) / steps);
    // busy = gemm + activation + optimizer + the rest of serving (with
    // replication, GEMM and activation also count the chunks computed for
    // the other worker on the copies' own thread, outside busy).
    std::printf(
        "  worker %d per step (ms): GEMM %.0f, activation %.0f, optimizer "
        "%.0f, other serving %.0f (busy %.0f), waiting for requests %.0f%s\n",
        index, ms[0], ms[1], ms[2],
        std::max(0.0, ms[3] - ms[0] - ms[1] - ms[2]), ms[3], ms[4],
        g_shape.replicate ? " (GEMM and activation include its copies')" : "");
    std::fflush(stdout);
    WriteFile(dir + "/" + name + ".busy", std::to_string(ms[3]));
    WriteFile(dir + "/" + name + ".gemm", std::to_string(ms[0]));
    WriteFile(dir + "/" + name + ".rows", std::to_string(rows));
  }
  (*plane)->Shutdown();
  service.Shutdown();
  return 0;
}

int RunTrainer(const std::string& dir, int rank, int steps, int micro_batches) {
  const auto config = BenchConfig(/*threads=*/1);
  control::RoutingTable routing;
  routing.ParseFromString(ReadFileToString(dir + "/routing.pb").value());
  auto plane = transport::NewUcxDataPlane(BenchDataPlaneOptions());
  if (!plane.ok() || !(*plane)->Start(nullptr).ok()) return 1;
  trainer::MoeLayerClient client(plane->get(), config, rank);
  client.SetRouting(routing);
  // Inputs and router from (rank, element): a balanced-ish random routing.
  const int kTokens = g_shape.tokens, kExperts = g_shape.experts;
  Tensor x = Tensor::Zeros(DType::kF32, {kTokens, kD}).value();
  Tensor dy = Tensor::Zeros(DType::kF32, {kTokens, kD}).value();
  std::vector<float> w(kD * kExperts);
  for (int64_t i = 0; i < x.num_elements(); ++i) {
    x.f32()[i] =
        static_cast<float>(RandomNormal(1, {1, (uint64_t)rank, (uint64_t)i}));
    dy.f32()[i] = static_cast<float>(
        1e-3 * RandomNormal(1, {2, (uint64_t)rank, (uint64_t)i}));
  }
  for (size_t i = 0; i < w.size(); ++i) {
    w[i] = static_cast<float>(0.001 * RandomNormal(1, {3, i}));
  }
  if (g_shape.skew > 0) {
    // Input 0 decides expert 0: strongly for the first share of the tokens,
    // strongly against it for the others (random among the rest).
    const int hot = static_cast<int>(g_shape.skew * kTokens + 0.5);
    for (int e = 0; e < kExperts; ++e) w[e] = e == 0 ? 1.0f : 0.0f;
    for (int t = 0; t < kTokens; ++t) x.f32()[t * kD] = t < hot ? 8.0f : -8.0f;
  }
  trainer::RouterOptions ro;
  ro.num_experts = kExperts;
  ro.top_k = g_shape.top_k;
  Clock::time_point start;
  double forward_s = 0, backward_s = 0, done_s = 0;
  for (int step = 0; step < kWarmup + steps; ++step) {
    if (step == kWarmup) {
      start = Clock::now();
      forward_s = backward_s = done_s = 0;
      if (rank == 0) WriteFile(dir + "/measure", "");
    }
    const auto route =
        trainer::RouteForward(ro, x.f32(), kTokens, kD, w.data(), nullptr);
    if (step == 0 && rank == 0) {
      // Token load per worker (expert e lives on worker e * workers / E).
      std::vector<double> per_worker(kWorkers, 0);
      for (int e = 0; e < kExperts; ++e) {
        per_worker[e * kWorkers / kExperts] += route.load[e];
      }
      double most = 0, sum = 0;
      for (double l : per_worker) {
        most = std::max(most, l);
        sum += l;
      }
      const int hottest = static_cast<int>(
          std::max_element(route.load.begin(), route.load.end()) -
          route.load.begin());
      std::printf(
          "  routing: hottest expert %d takes %.0f%% of assignments; "
          "per-worker token load max/mean %.2f\n",
          hottest, 100.0 * route.load[hottest] / (kTokens * g_shape.top_k),
          most / (sum / kWorkers));
      std::fflush(stdout);
    }
    Status s;
    for (int m = 0; m < micro_batches && s.ok(); ++m) {
      auto t0 = Clock::now();
      auto y = client.Forward(step, m, 0, x, route);
      auto t1 = Clock::now();
      Tensor dx;
      std::vector<float> d_gate;
      s = y.ok() ? client.Backward(step, m, 0, dy, &dx, &d_gate) : y.status();
      forward_s += Seconds(t0, t1);
      backward_s += Seconds(t1, Clock::now());
    }
    auto t2 = Clock::now();
    if (s.ok()) s = client.StepDone(step);
    done_s += Seconds(t2, Clock::now());
    if (!s.ok()) {
      std::fprintf(stderr, "trainer %d step %d: %s\n", rank, step,
                   s.ToString().c_str());
      return 1;
    }
  }
  const double seconds = Seconds(start, Clock::now());
  // Where a step's time goes, as the trainer sees it.
  std::printf(
      "  trainer %d per step: forward %.0f ms, backward %.0f ms, step done "
      "(waits for the update) %.0f ms\n",
      rank, 1e3 * forward_s / steps, 1e3 * backward_s / steps,
      1e3 * done_s / steps);
  std::fflush(stdout);
  WriteFile(dir + "/trainer-" + std::to_string(rank) + ".result",
            std::to_string(seconds));
  (*plane)->Shutdown();
  return 0;
}

// `args` and the flags that give a child process this layer's shape.
std::vector<std::string> WithShapeFlags(std::vector<std::string> args) {
  const std::vector<std::string> shape = {
      "--dtype",   g_dtype,
      "--tokens",  std::to_string(g_shape.tokens),
      "--experts", std::to_string(g_shape.experts),
      "--top-k",   std::to_string(g_shape.top_k),
      "--skew",    std::to_string(g_shape.skew)};
  args.insert(args.end(), shape.begin(), shape.end());
  if (g_shape.replicate) args.push_back("--replicate");
  return args;
}

pid_t Spawn(const std::vector<std::string>& args) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv("/proc/self/exe", argv.data());
    ::_exit(127);
  }
  return pid;
}

// The layer's GEMMs with raw BLAS, as the workers would run them for one
// step with the tokens spread evenly: per trainer and expert, forward
// (x W1, a W2) and input gradient (dy W2^T, dh W1^T) on its share of the
// tokens; per expert, weight gradients over both trainers' tokens. fp32 on
// OpenBLAS; bf16 through the workers' own Gemm (oneDNN) on operands
// converted beforehand. Returns seconds per step.
double RawGemmStep(int threads, bool bf16) {
  openblas_set_num_threads(threads);
  const int t = std::max(1, g_shape.tokens * g_shape.top_k / g_shape.experts);
  std::vector<float> x(2 * t * kD, 0.01f), h(2 * t * kF, 0.02f), y(2 * t * kD),
      w1(kD * kF, 0.01f), w2(kF * kD, 0.01f), g1(kD * kF), g2(kF * kD);
  std::vector<BFloat16> bx(2 * t * kD), bh(2 * t * kF), by(2 * t * kD),
      bw1(kD * kF), bw2(kF * kD);
  expert_worker::ConvertToBf16(x.data(), x.size(), bx.data());
  expert_worker::ConvertToBf16(h.data(), h.size(), bh.data());
  expert_worker::ConvertToBf16(x.data(), y.size(), by.data());
  expert_worker::ConvertToBf16(w1.data(), w1.size(), bw1.data());
  expert_worker::ConvertToBf16(w2.data(), w2.size(), bw2.data());
  auto gemm = expert_worker::NewCpuGemm(threads);
  // C (m, n) = op(A) op(B), in the chosen dtype.
  auto product = [&](bool ta, bool tb, int m, int n, int k, const float* a,
                     const BFloat16* a16, int lda, const float* b,
                     const BFloat16* b16, int ldb, float* c, int ldc) {
    if (bf16) {
      gemm->Bf16Gemm(ta, tb, m, n, k, 1, a16, lda, b16, ldb, 0, c, ldc);
    } else {
      gemm->Sgemm(ta, tb, m, n, k, 1, a, lda, b, ldb, 0, c, ldc);
    }
  };
  auto step = [&] {
    for (int e = 0; e < g_shape.experts; ++e) {
      for (int r = 0; r < kTrainers; ++r) {
        const int64_t xo = int64_t{r} * t * kD, ho = int64_t{r} * t * kF;
        product(false, false, t, kF, kD, x.data() + xo, bx.data() + xo, kD,
                w1.data(), bw1.data(), kF, h.data() + ho, kF);
        product(false, false, t, kD, kF, h.data() + ho, bh.data() + ho, kF,
                w2.data(), bw2.data(), kD, y.data() + xo, kD);
        product(false, true, t, kF, kD, y.data() + xo, by.data() + xo, kD,
                w2.data(), bw2.data(), kD, h.data() + ho, kF);
        product(false, true, t, kD, kF, h.data() + ho, bh.data() + ho, kF,
                w1.data(), bw1.data(), kF, x.data() + xo, kD);
      }
      product(true, false, kD, kF, 2 * t, x.data(), bx.data(), kD, h.data(),
              bh.data(), kF, g1.data(), kF);
      product(true, false, kF, kD, 2 * t, h.data(), bh.data(), kF, y.data(),
              by.data(), kD, g2.data(), kD);
    }
  };
  step();
  const int reps = 5;
  const auto start = Clock::now();
  for (int i = 0; i < reps; ++i) step();
  return Seconds(start, Clock::now()) / reps;
}

int RunParent(int steps, int micro_batches) {
  const std::string dir = (fs::temp_directory_path() /
                           ("moe_layer_bench." + std::to_string(::getpid())))
                              .string();
  fs::remove_all(dir);
  fs::create_directories(dir);
  const int kTokens = g_shape.tokens, kExperts = g_shape.experts;
  std::printf(
      "moe_layer (%s experts): d_model %d, d_ff %d, %d experts, top-%d, %d "
      "tokens x %d trainers, %d workers, %d steps of %d micro-batches, "
      "skew %.2f%s\n",
      g_dtype.c_str(), kD, kF, kExperts, g_shape.top_k, kTokens, kTrainers,
      kWorkers, steps, micro_batches, g_shape.skew,
      g_shape.replicate ? ", replication on" : "");
  std::fflush(stdout);
  const double raw = RawGemmStep(2, g_dtype == "bf16");
  WriteFile(dir + "/steps", std::to_string(steps));
  std::vector<pid_t> workers, trainers;
  for (int i = 0; i < kWorkers; ++i) {
    workers.push_back(
        Spawn(WithShapeFlags({"moe_layer_bench", "--role", "worker", "--dir",
                              dir, "--index", std::to_string(i)})));
  }
  int rc = 0;
  control::RoutingTable routing;
  routing.set_epoch(1);
  for (int i = 0; i < kWorkers && rc == 0; ++i) {
    const std::string addr = dir + "/w" + std::to_string(i) + ".addr";
    if (!WaitForFile(addr)) {
      std::fprintf(stderr, "worker %d did not start\n", i);
      rc = 1;
      break;
    }
    auto* w = routing.add_workers();
    w->set_name("w" + std::to_string(i));
    w->set_data_address(ReadFileToString(addr).value());
    w->set_confirmed(true);
  }
  for (int e = 0; e < kExperts; ++e) {
    auto* entry = routing.add_entries();
    entry->mutable_shard()->set_kind(control::EXPERT);
    entry->mutable_shard()->set_expert(e);
    entry->set_worker(e * kWorkers / kExperts);
  }
  WriteFile(dir + "/routing.pb", routing.SerializeAsString());
  for (int i = 0; i < kWorkers && rc == 0; ++i) {
    if (!WaitForFile(dir + "/w" + std::to_string(i) + ".ready")) rc = 1;
  }
  for (int r = 0; r < kTrainers && rc == 0; ++r) {
    trainers.push_back(Spawn(WithShapeFlags(
        {"moe_layer_bench", "--role", "trainer", "--dir", dir, "--rank",
         std::to_string(r), "--steps", std::to_string(steps), "--micro-batches",
         std::to_string(micro_batches)})));
  }
  for (pid_t p : trainers) {
    int status = 0;
    ::waitpid(p, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) rc = 1;
  }
  WriteFile(dir + "/stop", "");
  for (pid_t p : workers) ::waitpid(p, nullptr, 0);
  if (rc != 0) {
    std::fprintf(stderr, "moe_layer_bench: a process failed\n");
    fs::remove_all(dir);
    return 1;
  }
  double slowest = 0;
  for (int r = 0; r < kTrainers; ++r) {
    const std::string result =
        dir + "/trainer-" + std::to_string(r) + ".result";
    slowest = std::max(slowest, std::stod(ReadFileToString(result).value()));
  }
  double busiest_ms = 0, most_gemm = 0, gemm_sum = 0, most_rows = 0,
         rows_sum = 0;
  for (int i = 0; i < kWorkers; ++i) {
    auto busy = ReadFileToString(dir + "/w" + std::to_string(i) + ".busy");
    if (busy.ok()) busiest_ms = std::max(busiest_ms, std::stod(*busy));
    auto gemm = ReadFileToString(dir + "/w" + std::to_string(i) + ".gemm");
    if (gemm.ok()) {
      most_gemm = std::max(most_gemm, std::stod(*gemm));
      gemm_sum += std::stod(*gemm);
    }
    auto rows = ReadFileToString(dir + "/w" + std::to_string(i) + ".rows");
    if (rows.ok()) {
      most_rows = std::max(most_rows, std::stod(*rows));
      rows_sum += std::stod(*rows);
    }
  }
  if (rows_sum > 0) {
    std::printf(
        "  per-worker token load max/mean %.2f (the forward rows each worker "
        "computed, as a copy too)\n",
        most_rows / (rows_sum / kWorkers));
  }
  if (gemm_sum > 0) {
    // What each worker computed (its own chunks and its copies' for
    // others): the load replication evens out.
    std::printf("  per-worker expert GEMM time max/mean %.2f%s\n",
                most_gemm / (gemm_sum / kWorkers),
                g_shape.replicate ? " (with replication)" : "");
  }
  fs::remove_all(dir);
  const double step_ms = 1e3 * slowest / steps;
  std::printf(
      "  step %.0f ms; not in the busiest worker's compute (transport, "
      "routing, waiting for the other worker) %.0f ms\n",
      step_ms, std::max(0.0, step_ms - busiest_ms));
  const double tokens_per_s =
      kTrainers * kTokens * micro_batches * steps / slowest;
  const double flops_per_token = 12.0 * kD * kF * g_shape.top_k;
  const double gflops = tokens_per_s * flops_per_token / 1e9;
  const double raw_tokens_per_s = kTrainers * kTokens / raw;
  std::printf(
      "  system:   %8.0f tokens/s  %6.1f expert GFLOP/s  (target >= "
      "5000 tokens/s: %s)\n",
      tokens_per_s, gflops, tokens_per_s >= 5000 ? "met" : "NOT met");
  std::printf(
      "  raw %s GEMM: %8.0f tokens/s  %6.1f GFLOP/s (the same GEMMs with "
      "the tokens spread evenly, one process, 2 threads)\n",
      g_dtype.c_str(), raw_tokens_per_s,
      raw_tokens_per_s * flops_per_token / 1e9);
  std::printf("  system / raw %s GEMM = %.2f\n", g_dtype.c_str(),
              tokens_per_s / raw_tokens_per_s);
  return 0;
}

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) {
  switchyard::expert_worker::SelectBlasKernels(argv);
  std::string role, dir, dtype;
  int index = 0, steps = 10, micro_batches = 1;
  auto& shape = switchyard::g_shape;
  // A flag's value in [lo, hi] (a whole number unless `fraction`), or exit
  // 2 naming it.
  auto number = [](const std::string& flag, const std::string& value, double lo,
                   double hi, bool fraction = false) {
    char* end = nullptr;
    const double v = std::strtod(value.c_str(), &end);
    if (value.empty() || *end != '\0' || !(v >= lo && v <= hi) ||
        (!fraction && v != static_cast<double>(static_cast<int64_t>(v)))) {
      std::fprintf(stderr, "moe_layer_bench: %s %s: not a %s in [%g, %g]\n",
                   flag.c_str(), value.c_str(),
                   fraction ? "number" : "whole number", lo, hi);
      std::exit(2);
    }
    return v;
  };
  for (int i = 1; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(switchyard::kUsage, stdout);
      return 0;
    }
    if (flag == "--replicate") {  // The one flag without a value.
      shape.replicate = true;
      --i;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "moe_layer_bench: %s needs a value\n%s",
                   flag.c_str(), switchyard::kUsage);
      return 2;
    }
    const std::string value = argv[i + 1];
    if (flag == "--role") {
      role = value;
    } else if (flag == "--dir") {
      dir = value;
    } else if (flag == "--index" || flag == "--rank") {
      index = static_cast<int>(number(flag, value, 0, 1 << 20));
    } else if (flag == "--steps") {
      steps = static_cast<int>(number(flag, value, 1, 1e6));
    } else if (flag == "--micro-batches") {
      micro_batches = static_cast<int>(number(flag, value, 1, 1024));
    } else if (flag == "--dtype") {
      dtype = value;
    } else if (flag == "--tokens") {
      shape.tokens = static_cast<int>(number(flag, value, 1, 1 << 16));
    } else if (flag == "--experts") {
      shape.experts = static_cast<int>(number(flag, value, 2, 1024));
    } else if (flag == "--top-k") {
      shape.top_k = static_cast<int>(number(flag, value, 1, 1024));
    } else if (flag == "--skew") {
      shape.skew = number(flag, value, 0, 1, /*fraction=*/true);
    } else {
      std::fprintf(stderr, "moe_layer_bench: unknown flag %s\n%s", flag.c_str(),
                   switchyard::kUsage);
      return 2;
    }
  }
  if (shape.top_k > shape.experts) {
    std::fprintf(stderr, "moe_layer_bench: --top-k %d exceeds --experts %d\n",
                 shape.top_k, shape.experts);
    return 2;
  }
  if (!dtype.empty() && dtype != "fp32" && dtype != "bf16") {
    std::fprintf(stderr, "moe_layer_bench: --dtype is fp32 or bf16\n%s",
                 switchyard::kUsage);
    return 2;
  }
  if (!dtype.empty()) switchyard::g_dtype = dtype;
  if (role == "worker") return switchyard::RunWorker(dir, index);
  if (role == "trainer") {
    return switchyard::RunTrainer(dir, index, steps, micro_batches);
  }
  int rc = 0;
  for (const char* d : {"fp32", "bf16"}) {
    if (!dtype.empty() && dtype != d) continue;
    switchyard::g_dtype = d;
    rc |= switchyard::RunParent(steps, micro_batches);
  }
  return rc;
}
