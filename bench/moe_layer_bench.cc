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
// one --dtype names.
//
// usage: moe_layer_bench [--steps N] [--micro-batches M] [--dtype fp32|bf16]
//        (internal roles: --role worker|trainer ...)
#include <cblas.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_data_plane.h"
#include "common/files.h"
#include "common/random.h"
#include "expert_worker/cpu/blas_kernels.h"
#include "expert_worker/worker_service.h"
#include "trainer/moe_client.h"
#include "trainer/router.h"
#include "transport/data_plane.h"

namespace switchyard {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr int kD = 1024, kF = 4096, kExperts = 8, kTokens = 1024;
constexpr int kWorkers = 2, kTrainers = 2, kWarmup = 2;

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
  m->set_num_experts(kExperts);
  m->set_top_k(1);
  m->set_capacity_factor(0);
  c.mutable_cluster()->set_trainers(kTrainers);
  c.mutable_training()->set_threads(threads);
  c.mutable_training()->set_steps(1 << 30);
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
  WriteFile(dir + "/" + name + ".addr", (*plane)->address());
  if (!WaitForFile(dir + "/routing.pb")) return 1;
  control::RoutingTable routing;
  routing.ParseFromString(ReadFileToString(dir + "/routing.pb").value());
  if (!service.ApplyRouting(routing).ok()) return 1;
  WriteFile(dir + "/" + name + ".ready", "");
  // Serve until told to stop, or until the parent is gone.
  while (!fs::exists(dir + "/stop") && ::getppid() != 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
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
  trainer::RouterOptions ro;
  ro.num_experts = kExperts;
  ro.top_k = 1;
  Clock::time_point start;
  double forward_s = 0, backward_s = 0, done_s = 0;
  for (int step = 0; step < kWarmup + steps; ++step) {
    if (step == kWarmup) {
      start = Clock::now();
      forward_s = backward_s = done_s = 0;
    }
    const auto route =
        trainer::RouteForward(ro, x.f32(), kTokens, kD, w.data(), nullptr);
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

// The layer's GEMMs with raw BLAS, as the workers run them for one step:
// per trainer and expert, forward (x W1, a W2) and input gradient
// (dy W2^T, dh W1^T) on its 128 tokens; per expert, weight gradients over
// both trainers' 256 tokens. Returns seconds per step.
double RawGemmStep(int threads) {
  openblas_set_num_threads(threads);
  const int t = kTokens / kExperts;  // Tokens per expert per trainer.
  std::vector<float> x(2 * t * kD, 0.01f), h(2 * t * kF, 0.02f), y(2 * t * kD),
      w1(kD * kF, 0.01f), w2(kF * kD, 0.01f), g1(kD * kF), g2(kF * kD);
  auto step = [&] {
    for (int e = 0; e < kExperts; ++e) {
      for (int r = 0; r < kTrainers; ++r) {
        float* xr = x.data() + r * t * kD;
        float* hr = h.data() + r * t * kF;
        float* yr = y.data() + r * t * kD;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t, kF, kD, 1, xr,
                    kD, w1.data(), kF, 0, hr, kF);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t, kD, kF, 1, hr,
                    kF, w2.data(), kD, 0, yr, kD);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t, kF, kD, 1, yr,
                    kD, w2.data(), kD, 0, hr, kF);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t, kD, kF, 1, hr,
                    kF, w1.data(), kF, 0, xr, kD);
      }
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, kD, kF, 2 * t, 1,
                  x.data(), kD, h.data(), kF, 0, g1.data(), kF);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, kF, kD, 2 * t, 1,
                  h.data(), kF, y.data(), kD, 0, g2.data(), kD);
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
  std::printf(
      "moe_layer (%s experts): d_model %d, d_ff %d, %d experts, top-1, %d "
      "tokens x %d trainers, %d workers, %d steps of %d micro-batches\n",
      g_dtype.c_str(), kD, kF, kExperts, kTokens, kTrainers, kWorkers, steps,
      micro_batches);
  std::fflush(stdout);
  const double raw = RawGemmStep(2);
  std::vector<pid_t> workers, trainers;
  for (int i = 0; i < kWorkers; ++i) {
    workers.push_back(
        Spawn({"moe_layer_bench", "--role", "worker", "--dir", dir, "--index",
               std::to_string(i), "--dtype", g_dtype}));
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
    trainers.push_back(Spawn(
        {"moe_layer_bench", "--role", "trainer", "--dir", dir, "--rank",
         std::to_string(r), "--steps", std::to_string(steps), "--micro-batches",
         std::to_string(micro_batches), "--dtype", g_dtype}));
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
  fs::remove_all(dir);
  const double tokens_per_s =
      kTrainers * kTokens * micro_batches * steps / slowest;
  const double flops_per_token = 12.0 * kD * kF;
  const double gflops = tokens_per_s * flops_per_token / 1e9;
  const double raw_tokens_per_s = kTrainers * kTokens / raw;
  std::printf(
      "  system:   %8.0f tokens/s  %6.1f expert GFLOP/s  (target >= "
      "5000 tokens/s: %s)\n",
      tokens_per_s, gflops, tokens_per_s >= 5000 ? "met" : "NOT met");
  std::printf(
      "  raw BLAS: %8.0f tokens/s  %6.1f GFLOP/s (the same GEMMs, "
      "one process, 2 threads)\n",
      raw_tokens_per_s, raw_tokens_per_s * flops_per_token / 1e9);
  std::printf("  system / raw BLAS = %.2f\n", tokens_per_s / raw_tokens_per_s);
  return 0;
}

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) {
  switchyard::expert_worker::SelectBlasKernels(argv);
  std::string role, dir, dtype;
  int index = 0, steps = 10, micro_batches = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--role")
      role = value;
    else if (flag == "--dir")
      dir = value;
    else if (flag == "--index" || flag == "--rank")
      index = std::stoi(value);
    else if (flag == "--steps")
      steps = std::stoi(value);
    else if (flag == "--micro-batches")
      micro_batches = std::stoi(value);
    else if (flag == "--dtype")
      dtype = value;
  }
  if (!dtype.empty() && dtype != "fp32" && dtype != "bf16") {
    std::fprintf(stderr, "moe_layer_bench: --dtype is fp32 or bf16\n");
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
