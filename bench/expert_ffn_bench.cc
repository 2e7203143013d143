// bench/expert_ffn: expert forward + backward throughput on the CPU.
//
// For d_model 1024, d_ff 4096 (GELU, biases) and 64..4096 tokens it times
// ExpertFfn::Forward + BackwardInput + AccumulateGrads against the same six
// products on the same shapes in the same process (raw GEMM: cblas_sgemm for
// fp32, Gemm::Bf16Gemm on pre-converted operands for bf16), and
// measures the machine's FMA peak with a register-only FMA loop on every
// core. It checks the expert's output against the raw GEMMs' before timing.
// Each size runs three rounds of FMA peak, raw GEMMs, expert, and prints
// the median round.
// Ratios printed: expert / raw GEMM (target >= 0.85 from 1024 tokens) and
// raw GEMM / FMA peak (target >= 0.75). Then the optimizers' update sweep
// over one (1024, 4096) weight against a memcpy of it. docs/performance.md
// has the figures.
//
// usage: expert_ffn_bench [--optimizer]   (--optimizer: the sweeps only)
#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common/random.h"
#include "expert_worker/cpu/activation_kernels.h"
#include "expert_worker/cpu/blas_kernels.h"
#include "expert_worker/expert_ffn.h"
#include "expert_worker/optimizer.h"

namespace switchyard::expert_worker {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// 16 independent FMA chains of 16 floats; 2 * 16 * 16 FLOPs per iteration.
__attribute__((target("avx512f"))) float FmaLoopAvx512(int64_t iters) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 sum = acc[0];
  for (int i = 1; i < 16; ++i) sum = _mm512_add_ps(sum, acc[i]);
  float out[16];
  _mm512_storeu_ps(out, sum);  // (_mm512_reduce_add_ps trips GCC 12's
  return out[0];               // -Wuninitialized in its own header.)
}

// 12 chains of 8 floats (AVX2 + FMA).
__attribute__((target("avx2,fma"))) float FmaLoopAvx2(int64_t iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(1.0f + i * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  float out[8];
  __m256 sum = acc[0];
  for (int i = 1; i < 12; ++i) sum = _mm256_add_ps(sum, acc[i]);
  _mm256_storeu_ps(out, sum);
  return out[0];
}

// GFLOP/s of FMA loops on `threads` cores.
double FmaPeakGflops(int threads) {
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const int64_t iters = 50'000'000;
  const double flops_per_iter = avx512 ? 2.0 * 16 * 16 : 2.0 * 12 * 8;
  std::atomic<float> sink{0};
  const auto start = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      sink = sink + (avx512 ? FmaLoopAvx512(iters) : FmaLoopAvx2(iters));
    });
  }
  for (auto& t : pool) t.join();
  const double s = Seconds(start, Clock::now());
  return flops_per_iter * iters * threads / s / 1e9;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void Fill(Tensor* t, uint64_t tag, float scale) {
  for (int64_t i = 0; i < t->num_elements(); ++i) {
    t->f32()[i] =
        static_cast<float>(scale * RandomNormal(7, {tag, uint64_t(i)}));
  }
}

// Seconds per call of fn, over at least `reps` calls and `seconds`. One
// untimed call first: the FMA loop's threads have just had the cores, and
// the first call after them also pays for waking OpenMP's threads and
// refilling the caches.
template <typename Fn>
double TimeIt(Fn&& fn, int min_reps, double min_seconds) {
  fn();
  int reps = 0;
  const auto start = Clock::now();
  do {
    fn();
    ++reps;
  } while (reps < min_reps || Seconds(start, Clock::now()) < min_seconds);
  return Seconds(start, Clock::now()) / reps;
}

// The optimizers' sweep over one (d, f) fp32 weight, its state and its
// bf16 copy, as a worker's update runs it, against one copy of the weight
// (memcpy: a read and a write of its bytes, the least any sweep does).
// Prints the time of each and their ratio; false if a sweep failed.
bool OptimizerSweeps(int d, int f, int threads) {
  SetKernelThreads(threads);
  const int64_t n = int64_t{d} * f;
  std::vector<float> from(n, 0.5f), to(n);
  auto time_it = [](auto&& fn) { return TimeIt(fn, 3, 0.5); };
  const double copy_s =
      time_it([&] { std::memcpy(to.data(), from.data(), n * sizeof(float)); });
  std::printf(
      "\noptimizer sweep over a (%d, %d) fp32 weight with its bf16 copy, "
      "%d threads; one memcpy of the weight %.2f ms\n",
      d, f, threads, 1e3 * copy_s);
  bool ok = true;
  for (const char* name : {"adamw", "adafactor"}) {
    config::TrainingConfig t;
    t.set_optimizer(name);
    auto opt = Optimizer::Create(t);
    Tensor p = Tensor::Zeros(DType::kF32, {d, f}).value();
    Tensor g = Tensor::Zeros(DType::kF32, {d, f}).value();
    Tensor copy = Tensor::Zeros(DType::kBF16, {d, f}).value();
    Fill(&p, 3, 0.03f);
    Fill(&g, 4, 0.001f);
    if (!opt.ok()) return false;
    OptimizerState state = (*opt)->NewState(p).value();
    int64_t step = 0;
    Status status;
    const double sweep_s = time_it([&] {
      if (status.ok()) status = (*opt)->Apply(step++, g, &p, &state, &copy);
    });
    if (!status.ok()) {
      std::printf("%s: %s\n", name, status.ToString().c_str());
      ok = false;
      continue;
    }
    std::printf("  %-9s %8.2f ms  (%.1f x the copy)\n", name, 1e3 * sweep_s,
                sweep_s / copy_s);
  }
  return ok;
}

int Run() {
  const int d = 1024, f = 4096, threads = std::thread::hardware_concurrency();
  openblas_set_num_threads(threads);
  std::printf(
      "expert_ffn: d_model %d, d_ff %d, GELU, %d threads, OpenBLAS "
      "core %s (%s)\n",
      d, f, threads, BlasKernelName(), BlasThreading());
  const double peak = FmaPeakGflops(threads);
  std::printf("FMA peak (register-only loop, %d cores): %.1f GFLOP/s\n",
              threads, peak);
  std::printf("%6s %5s %12s %12s %12s %10s %10s\n", "tokens", "dtype",
              "tokens/s", "expert GF/s", "raw GF/s", "expert/raw", "raw/peak");
  auto gemm = NewCpuGemm(threads);
  bool all_ok = true;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    ExpertShape shape;
    shape.d_model = d;
    shape.d_ff_shard = f;
    shape.compute_dtype = dtype;
    ExpertFfn ffn(shape, gemm.get());
    ExpertParams p = ExpertParams::Zeros(shape).value();
    ExpertParams grads = ExpertParams::Zeros(shape).value();
    Fill(&p.w1, 1, 0.03f);
    Fill(&p.w2, 2, 0.015f);
    // As the worker does: bf16 copies of the weights, refreshed per update.
    if (dtype == DType::kBF16 && !p.RefreshBf16().ok()) return 1;
    for (int tokens : {64, 256, 1024, 4096}) {
      Tensor x = Tensor::Zeros(DType::kF32, {tokens, d}).value();
      Tensor dy = Tensor::Zeros(DType::kF32, {tokens, d}).value();
      Fill(&x, 3, 1.0f);
      Fill(&dy, 4, 1.0f);
      Tensor h = Tensor::Zeros(DType::kF32, {tokens, f}).value();
      Tensor y = Tensor::Zeros(DType::kF32, {tokens, d}).value();
      Tensor dh = Tensor::Zeros(DType::kF32, {tokens, f}).value();
      Tensor dx = Tensor::Zeros(DType::kF32, {tokens, d}).value();
      Tensor a = Tensor::Zeros(DType::kF32, {tokens, f}).value();
      // Scratch for the raw GEMMs.
      std::vector<float> rh(int64_t{tokens} * f), ry(int64_t{tokens} * d),
          rda(int64_t{tokens} * f), rdx(int64_t{tokens} * d),
          rw1(int64_t{d} * f), rw2(int64_t{f} * d);
      auto expert_step = [&] {
        (void)ffn.Forward(p, x, &h, &y);
        (void)ffn.BackwardInput(p, h, dy, &dh, &a, &dx);
        (void)ffn.AccumulateGrads(x, a, dh, dy, &grads);
      };
      // bf16 baseline: the same six products through Bf16Gemm on operands
      // converted once, outside the timing.
      std::vector<BFloat16> bx(int64_t{tokens} * d), bdy(int64_t{tokens} * d),
          bw1(int64_t{d} * f), bw2(int64_t{f} * d), bh(int64_t{tokens} * f),
          bda(int64_t{tokens} * f);
      for (size_t i = 0; i < bx.size(); ++i) {
        bx[i] = FloatToBf16(x.f32()[i]);
        bdy[i] = FloatToBf16(dy.f32()[i]);
      }
      for (size_t i = 0; i < bw1.size(); ++i) {
        bw1[i] = FloatToBf16(p.w1.f32()[i]);
        bw2[i] = FloatToBf16(p.w2.f32()[i]);
      }
      auto raw_bf16_step = [&] {
        Gemm* g = gemm.get();
        g->Bf16Gemm(false, false, tokens, f, d, 1, bx.data(), d, bw1.data(), f,
                    0, rh.data(), f);
        g->Bf16Gemm(false, false, tokens, d, f, 1, bh.data(), f, bw2.data(), d,
                    0, ry.data(), d);
        g->Bf16Gemm(false, true, tokens, f, d, 1, bdy.data(), d, bw2.data(), d,
                    0, rda.data(), f);
        g->Bf16Gemm(false, true, tokens, d, f, 1, bda.data(), f, bw1.data(), f,
                    0, rdx.data(), d);
        g->Bf16Gemm(true, false, d, f, tokens, 1, bx.data(), d, bda.data(), f,
                    1, rw1.data(), f);
        g->Bf16Gemm(true, false, f, d, tokens, 1, bh.data(), f, bdy.data(), d,
                    1, rw2.data(), d);
      };
      auto raw_step = [&] {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tokens, f, d, 1,
                    x.f32(), d, p.w1.f32(), f, 0, rh.data(), f);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tokens, d, f, 1,
                    rh.data(), f, p.w2.f32(), d, 0, ry.data(), d);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tokens, f, d, 1,
                    dy.f32(), d, p.w2.f32(), d, 0, rda.data(), f);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tokens, d, f, 1,
                    rda.data(), f, p.w1.f32(), f, 0, rdx.data(), d);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, f, tokens, 1,
                    x.f32(), d, rda.data(), f, 1, rw1.data(), f);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, f, d, tokens, 1,
                    rh.data(), f, dy.f32(), d, 1, rw2.data(), d);
      };
      // Verify: the expert's h equals the raw x W1 (fp32: exactly the same
      // GEMM; bf16: within bf16 rounding).
      expert_step();
      raw_step();
      double err = 0, scale = 1e-9;
      for (int64_t i = 0; i < int64_t{tokens} * f; ++i) {
        err = std::max(err, double(std::abs(h.f32()[i] - rh[i])));
        scale = std::max(scale, double(std::abs(rh[i])));
      }
      const double tol = dtype == DType::kF32 ? 1e-6 : 2e-2;
      if (err / scale > tol) {
        std::printf("VERIFY FAILED: tokens %d %s: rel err %.3g\n", tokens,
                    std::string(DTypeName(dtype)).c_str(), err / scale);
        all_ok = false;
      }
      auto time_it = [](auto&& fn) { return TimeIt(fn, 2, 0.35); };
      // Rounds alternate the raw GEMMs and the expert, so that a fast or
      // slow spell of the shared VM weighs on both alike; the median round
      // counts.
      // The FMA peak is measured in every round too: raw/peak sets the raw
      // GEMMs against the peak of the same moment.
      const double flops = 6.0 * 2.0 * tokens * d * f;
      std::vector<double> raw_times, expert_times, ratios, of_peak;
      for (int round = 0; round < 3; ++round) {
        const double round_peak = FmaPeakGflops(threads);
        raw_times.push_back(dtype == DType::kF32 ? time_it(raw_step)
                                                 : time_it(raw_bf16_step));
        expert_times.push_back(time_it(expert_step));
        ratios.push_back(raw_times.back() / expert_times.back());
        of_peak.push_back(flops / raw_times.back() / 1e9 / round_peak);
      }
      const double t_raw = Median(raw_times);
      const double t_expert = Median(expert_times);
      std::printf("%6d %5s %12.0f %12.1f %12.1f %10.2f %10.2f\n", tokens,
                  std::string(DTypeName(dtype)).c_str(), tokens / t_expert,
                  flops / t_expert / 1e9, flops / t_raw / 1e9, Median(ratios),
                  Median(of_peak));
    }
  }
  return OptimizerSweeps(d, f, threads) && all_ok ? 0 : 1;
}

}  // namespace
}  // namespace switchyard::expert_worker

int main(int argc, char** argv) {
  // OPENBLAS_CORETYPE=Haswell bench/expert_ffn_bench measures the kernels
  // OpenBLAS picks on its own here.
  switchyard::expert_worker::SelectBlasKernels(argv);
  const std::string flag = argc > 1 ? argv[1] : "";
  if (flag == "--help") {
    std::printf("usage: expert_ffn_bench [--optimizer]\n");
    return 0;
  }
  if (argc > 2 || (!flag.empty() && flag != "--optimizer")) {
    std::fprintf(stderr, "usage: expert_ffn_bench [--optimizer]\n");
    return 2;
  }
  if (flag == "--optimizer") {
    const int threads = static_cast<int>(std::thread::hardware_concurrency());
    return switchyard::expert_worker::OptimizerSweeps(1024, 4096, threads) ? 0
                                                                           : 1;
  }
  return switchyard::expert_worker::Run();
}
