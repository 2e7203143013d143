// bench/transport: the data plane's expert-request round trip (send x,
// receive y of the same size) against ucx_perftest on the same transports,
// sizes and machine, run by this program.
//
//   bandwidth: 4 KiB..64 MiB echoes with 4 requests in flight, sent and
//              waited for with SendAndWait as a trainer's requests are;
//              bytes moved both ways per second, against ucx_perftest
//              tag_bw (the better of its default buffers and transparent
//              huge pages).
//   fetch:     from 1 MiB up, 8 requests at once without a payload, each
//              answered with that many bytes from a serving thread, as a
//              live move's new home fetches a shard from its old home:
//              bytes moved one way per second (no ucx_perftest row).
//   latency:   a 4 KiB echo, one at a time, against twice ucx_perftest
//              tag_lat's one-way latency (its round trip): median against
//              median, and mean against mean, in rounds that alternate
//              ours and ucx_perftest's; the median round's ratio counts.
// Transports: shared memory (UCX_TLS=posix,cma,tcp,self: UCX 1.13 needs tcp
// to set up connections, and moves data over shared memory) and TCP on
// loopback (UCX_TLS=tcp,self). Every echo is checked byte for byte.
// Targets (docs/performance.md): >= 0.8 of ucx_perftest bandwidth for large
// payloads; small round trips within 2x of ucx_perftest's.
//
// usage: transport_bench [--latency | --bytes N] [--rounds N]
//                        [--transport shm|tcp] [--round-trips N]
//   --latency: the round trips only
//   --bytes N: the bandwidth rows for N-byte payloads only (a multiple of
//              4 KiB), then the round trips
//   --rounds N: rounds per bandwidth size and of round trips (default 3),
//              ours and ucx_perftest's alternating; the median round's
//              ratio counts
//   --transport: one transport only (default both)
//   --round-trips N: 4 KiB round trips timed per round (default 2000;
//              more for a profile)
#include <signal.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_data_plane.h"
#include "common/buffer_pool.h"
#include "common/digest.h"
#include "common/logging.h"
#include "common/mutex.h"
#include "transport/data_plane.h"

namespace switchyard::transport {
namespace {

using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

std::string g_self;
bool g_latency_only = false;
std::string g_transport;   // --transport: "shm", "tcp" or both when empty
int g_round_trips = 2000;  // --round-trips
size_t g_only_bytes = 0;   // --bytes
int g_rounds = 3;          // --rounds

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

std::string Joined(const std::vector<double>& v) {
  std::string out;
  char buf[32];
  for (double x : v) {
    std::snprintf(buf, sizeof(buf), " %.2f", x);
    out += buf;
  }
  return out;
}

int Serve(const std::string& file, const std::string& tls) {
  DataPlaneOptions options = BenchDataPlaneOptions();
  options.ucx_tls = tls;
  options.max_inflight_bytes = size_t{1} << 31;
  auto server = NewUcxDataPlane(options).value();
  // step 2: a fetch (as a shard handover is): answered from another
  // thread with header.expert x 1024 floats (bytes 0x07) of a tensor made
  // once. Static: the detached thread outlives any return from here.
  static Mutex mu;
  static CondVar cv;
  static std::deque<std::pair<WireHeader, Reply>> fetches;
  std::thread fetcher([] {
    Tensor big;
    while (true) {
      std::pair<WireHeader, Reply> f;
      {
        MutexLock lock(&mu);
        while (fetches.empty()) cv.Wait(&mu);
        f = std::move(fetches.front());
        fetches.pop_front();
      }
      if (big.num_elements() != int64_t{f.first.expert} * 1024) {
        big = Tensor::Zeros(DType::kF32, {f.first.expert, 1024}).value();
        std::memset(big.data(), 7, big.num_bytes());
      }
      f.second(TensorResponse(f.first, big));
    }
  });
  fetcher.detach();
  Status s = server->Start([&](Message request, Reply reply) {
    if (request.header.step == 2) {
      MutexLock lock(&mu);
      fetches.emplace_back(request.header, std::move(reply));
      cv.NotifyOne();
      return;
    }
    // step 1: one-way (dispatch only): answer without a payload.
    reply(TensorResponse(request.header, request.header.step == 1
                                             ? Tensor()
                                             : std::move(request.payload)));
  });
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  std::ofstream(file + ".tmp") << server->address() << "\n";
  std::rename((file + ".tmp").c_str(), file.c_str());
  while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
}

// Runs ucx_perftest (server and client) and returns its "Final:" row
// (zeros when it failed): latency in us (1: median, 2: average),
// bandwidth in MB/s (4). `memory`, when not empty, goes into the
// environment too.
std::vector<double> PerftestFinal(const std::string& tls,
                                  const std::string& test, size_t bytes,
                                  int iters, const std::string& memory = "") {
  static int port = 20000 + ::getpid() % 20000;
  ++port;
  const std::string env = "UCX_TLS=" + tls + " " + memory + " ";
  const std::string server =
      env + "ucx_perftest -p " + std::to_string(port) + " > /dev/null 2>&1 &";
  std::vector<double> row(8, 0.0);
  if (std::system(server.c_str()) != 0) return row;
  std::this_thread::sleep_for(Ms(300));
  const std::string client = env + "ucx_perftest 127.0.0.1 -p " +
                             std::to_string(port) + " -t " + test + " -s " +
                             std::to_string(bytes) + " -n " +
                             std::to_string(iters) + " 2>&1";
  FILE* pipe = ::popen(client.c_str(), "r");
  char line[512];
  while (std::fgets(line, sizeof(line), pipe)) {
    if (std::strncmp(line, "Final:", 6) != 0) continue;
    std::sscanf(line + 6, "%lf %lf %lf %lf %lf %lf %lf %lf", &row[0], &row[1],
                &row[2], &row[3], &row[4], &row[5], &row[6], &row[7]);
  }
  ::pclose(pipe);
  return row;
}

// The copy under every shared-memory rendezvous: UCX's CMA transport
// moves a payload with process_vm_readv calls of 512 KiB, run by the
// receiver from the sender's memory into its own. This runs the same
// calls from a child process's touched huge-page buffer into `buffers`
// destination buffers in turn (from a BufferPool, as the data plane's
// receive buffers are) and returns MB/s. ucx_perftest's receiver reuses
// one buffer, which stays in the CPU's cache; a receiver that keeps each
// payload until it is answered, as ours does, writes to several.
double CmaCopy(size_t bytes, int buffers, int iters) {
  constexpr size_t kSegment = size_t{512} << 10;
  constexpr size_t kHuge = size_t{2} << 20;
  int to_parent[2], to_child[2];
  if (::pipe(to_parent) != 0 || ::pipe(to_child) != 0) return 0;
  const pid_t child = ::fork();
  if (child == 0) {
    // Only system calls here: the parent has other threads.
    void* map = ::mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    auto* src = reinterpret_cast<uint8_t*>(
        (reinterpret_cast<uintptr_t>(map) + kHuge - 1) & ~(kHuge - 1));
    ::madvise(src, bytes, MADV_HUGEPAGE);
    for (size_t i = 0; i < bytes; ++i) src[i] = static_cast<uint8_t>(i * 7);
    (void)!::write(to_parent[1], &src, sizeof(src));
    char c;
    (void)!::read(to_child[0], &c, 1);
    ::_exit(0);
  }
  uint8_t* src = nullptr;
  const bool got =
      ::read(to_parent[0], &src, sizeof(src)) == sizeof(src) && src != nullptr;
  const std::shared_ptr<BufferPool> pool = BufferPool::Create(0);
  std::vector<Tensor> dst;
  for (int b = 0; b < buffers; ++b) {
    dst.push_back(
        pool->Take(DType::kF32, {static_cast<int64_t>(bytes / 4)}).value());
    std::memset(dst.back().data(), 0, bytes);
  }
  double mbs = 0;
  if (got) {
    const auto start = Clock::now();
    for (int i = 0; i < iters; ++i) {
      auto* to = static_cast<uint8_t*>(dst[i % buffers].data());
      for (size_t off = 0; off < bytes; off += kSegment) {
        const size_t n = std::min(kSegment, bytes - off);
        iovec local{to + off, n}, remote{src + off, n};
        if (::process_vm_readv(child, &local, 1, &remote, 1, 0) !=
            static_cast<ssize_t>(n)) {
          iters = 0;
          break;
        }
      }
    }
    const double s =
        std::chrono::duration<double>(Clock::now() - start).count();
    mbs = iters > 0 ? double(bytes) * iters / s / (1 << 20) : 0;
  }
  (void)!::write(to_child[1], "x", 1);
  ::waitpid(child, nullptr, 0);
  for (int fd : {to_parent[0], to_parent[1], to_child[0], to_child[1]}) {
    ::close(fd);
  }
  return mbs;
}

Message Echo(size_t bytes, uint32_t seed) {
  Message m;
  m.header.kind = static_cast<uint8_t>(MessageKind::kEcho);
  const int64_t cols = 1024;
  const int64_t rows = static_cast<int64_t>(bytes / 4 / cols);
  // From a BufferPool, as a trainer's token batches are (MoeLayerClient).
  static const std::shared_ptr<BufferPool> pool = BufferPool::Create(0);
  m.payload = pool->Take(DType::kF32, {rows, cols}).value();
  auto* words = static_cast<uint32_t*>(m.payload.data());
  for (int64_t i = 0; i < rows * cols; ++i) words[i] = seed + uint32_t(i);
  m.header.dtype = static_cast<uint8_t>(DType::kF32);
  m.header.rows = rows;
  m.header.cols = cols;
  m.header.payload_bytes = m.payload.num_bytes();
  return m;
}

// Echo bandwidth (MB/s, both directions, 2^20 bytes) with `window` in
// flight, sent and waited for as a trainer does (SendAndWait: this thread
// drives the network while it waits); with `one_way`, the server answers
// without a payload and only the request bytes count.
double EchoBandwidth(DataPlane* client, const std::string& peer, size_t bytes,
                     int iters, int window, bool* ok, bool one_way = false) {
  Mutex mu;
  CondVar cv;
  int in_flight = 0, sent = 0, checked = 0;
  // Answers are checked by this thread between its waits, not in the
  // callbacks, which run while the network is being driven.
  std::deque<StatusOr<Message>> arrived;
  Message proto = Echo(bytes, 11);
  if (one_way) proto.header.step = 1;
  // Every answer is checked against the xxh3 of what was sent: one read of
  // the answer at hash speed (tens of GB/s here) where a memcmp reads both
  // buffers, on the cores the transfers need (a run without any check gave
  // 0.99 of ucx_perftest at 16 MiB, one with memcmp 0.55-0.93).
  const uint64_t sent_hash =
      Xxh3(proto.payload.data(), proto.payload.num_bytes());
  const auto start = Clock::now();
  MutexLock lock(&mu);
  while (checked < iters) {
    std::vector<SendRequest> sends;
    for (; sent < iters && in_flight < window; ++sent, ++in_flight) {
      Message m;
      m.header = proto.header;
      m.payload = proto.payload;  // Shared buffer: the send only reads it.
      sends.push_back(
          SendRequest{peer, std::move(m), Ms(60000), [&](StatusOr<Message> r) {
                        MutexLock guard(&mu);
                        arrived.push_back(std::move(r));
                        --in_flight;
                        cv.NotifyAll();
                      }});
    }
    client->SendAndWait(std::move(sends), &mu, &cv, Clock::now() + Ms(60000),
                        [&] { return !arrived.empty(); });
    std::deque<StatusOr<Message>> batch;
    batch.swap(arrived);
    lock.Unlock();
    for (const StatusOr<Message>& r : batch) {
      // One way: the answer carries no payload by design.
      const bool good =
          r.ok() &&
          (one_way ? r->payload.empty()
                   : r->payload.num_bytes() == proto.payload.num_bytes() &&
                         Xxh3(r->payload.data(), r->payload.num_bytes()) ==
                             sent_hash);
      if (!good && *ok) {
        std::fprintf(
            stderr, "echo of %zu bytes failed: %s\n", bytes,
            r.ok() ? "payload differs" : r.status().ToString().c_str());
      }
      if (!good) *ok = false;
    }
    lock.Lock();
    checked += static_cast<int>(batch.size());
  }
  const double s = std::chrono::duration<double>(Clock::now() - start).count();
  return (one_way ? 1.0 : 2.0) * bytes * iters / s / (1 << 20);
}

// Fetch bandwidth (MB/s, 2^20 bytes): `count` requests of `bytes` each sent
// at once with SendAll and answered from the server's serving thread, as a
// new home fetches a shard's tensors from its old home (ShardTransfer).
double FetchBandwidth(DataPlane* client, const std::string& peer, size_t bytes,
                      int count, int iters, bool* ok) {
  const auto start = Clock::now();
  for (int i = 0; i < iters; ++i) {
    std::vector<Outgoing> requests;
    for (int r = 0; r < count; ++r) {
      Message m;
      m.header.kind = static_cast<uint8_t>(MessageKind::kEcho);
      m.header.step = 2;
      m.header.expert = static_cast<int32_t>(bytes / 4096);
      requests.push_back({peer, std::move(m), "fetch"});
    }
    auto replies = SendAll(client, std::move(requests), Ms(60000));
    const auto* last = replies.ok() && !replies->empty()
                           ? static_cast<const uint8_t*>(replies->back().data())
                           : nullptr;
    if (!replies.ok() || replies->size() != size_t(count) ||
        replies->back().num_bytes() != bytes || last[0] != 7 ||
        last[bytes - 1] != 7) {
      std::fprintf(stderr, "fetch of %zu bytes failed: %s\n", bytes,
                   replies.ok() ? "wrong size or contents"
                                : replies.status().ToString().c_str());
      *ok = false;
      return 0;
    }
  }
  const double s = std::chrono::duration<double>(Clock::now() - start).count();
  return double(bytes) * count * iters / s / (1 << 20);
}

int Run() {
  bool ok = true;
  std::printf("%-6s %10s %14s %16s %8s\n", "tls", "bytes", "echo MB/s",
              "perftest MB/s", "ratio");
  struct Transport {
    const char* name;
    const char* tls;
  };
  for (Transport t :
       {Transport{"shm", "posix,cma,tcp,self"}, Transport{"tcp", "tcp,self"}}) {
    if (!g_transport.empty() && g_transport != t.name) continue;
    const std::string file =
        "/tmp/switchyard_transport_bench_" + std::to_string(::getpid());
    std::remove(file.c_str());
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::execl(g_self.c_str(), g_self.c_str(), "--serve", file.c_str(), t.tls,
              nullptr);
      ::_exit(127);
    }
    std::string address;
    for (int i = 0; i < 200 && address.empty(); ++i) {
      std::ifstream(file) >> address;
      std::this_thread::sleep_for(Ms(20));
    }
    DataPlaneOptions options = BenchDataPlaneOptions();
    options.ucx_tls = t.tls;
    auto client = NewUcxDataPlane(options).value();
    if (address.empty() || !client->Start(nullptr).ok()) {
      std::fprintf(stderr, "cannot start the %s echo server\n", t.name);
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      return 1;
    }
    std::vector<size_t> sizes = {size_t{4} << 10, size_t{64} << 10,
                                 size_t{1} << 20, size_t{16} << 20,
                                 size_t{64} << 20};
    if (g_latency_only) sizes.clear();
    if (g_only_bytes != 0) sizes = {g_only_bytes};
    for (size_t bytes : sizes) {
      const int iters = static_cast<int>(
          std::clamp<size_t>((size_t{2} << 30) / bytes, 20, 2000));
      EchoBandwidth(client.get(), address, bytes, 5, 4, &ok);  // Warm up.
      // Rounds alternate ours and ucx_perftest's, so that a fast or slow
      // spell of the shared VM weighs on both alike; each round's ratio is
      // taken, and the median round is the result.
      std::vector<double> ours, theirs, ratios, one_way, one_way_ratios;
      // Shared memory: the copy's own ceiling, into one reused buffer (as
      // ucx_perftest receives) and into four in turn (as we do).
      const bool ceiling =
          std::strcmp(t.name, "shm") == 0 && bytes >= (size_t{16} << 20);
      std::vector<double> copy_one, copy_four;
      for (int r = 0; r < g_rounds; ++r) {
        ours.push_back(
            EchoBandwidth(client.get(), address, bytes, iters, 4, &ok));
        // The better of ucx_perftest's default buffers (UCX's sysv shared
        // memory, 4 KiB pages) and transparent huge pages, as Switchyard's
        // tensors are: on the CI VM huge pages moved 16 MiB messages at
        // 17-20 GB/s against 8-11 with the default.
        theirs.push_back(
            std::max(PerftestFinal(t.tls, "tag_bw", bytes, iters)[4],
                     PerftestFinal(t.tls, "tag_bw", bytes, iters,
                                   "UCX_ALLOC_PRIO=thp,mmap,heap")[4]));
        ratios.push_back(theirs.back() > 0 ? ours.back() / theirs.back() : 0);
        if (bytes >= (size_t{16} << 20)) {
          one_way.push_back(EchoBandwidth(client.get(), address, bytes, iters,
                                          4, &ok, /*one_way=*/true));
          one_way_ratios.push_back(
              theirs.back() > 0 ? one_way.back() / theirs.back() : 0);
        }
        if (ceiling) {
          copy_one.push_back(CmaCopy(bytes, 1, iters));
          copy_four.push_back(CmaCopy(bytes, 4, iters));
        }
      }
      std::printf("%-6s %10zu %14.0f %16.0f %8.2f  rounds:%s\n", t.name, bytes,
                  Median(ours), Median(theirs), Median(ratios),
                  Joined(ratios).c_str());
      if (!one_way.empty()) {
        std::printf("%-6s %10zu %14.0f %16s %8.2f  rounds:%s (one way)\n",
                    t.name, bytes, Median(one_way), "", Median(one_way_ratios),
                    Joined(one_way_ratios).c_str());
      }
      if (bytes >= (size_t{1} << 20)) {
        const int count = 8;
        std::printf(
            "%-6s %10zu %14.0f  (fetch, one way: %d at once, "
            "answered from a serving thread)\n",
            t.name, bytes,
            FetchBandwidth(client.get(), address, bytes, count,
                           std::max(1, iters / count), &ok),
            count);
      }
      if (ceiling) {
        std::printf(
            "%-6s %10zu process_vm_readv copy MB/s: one reused buffer %.0f, "
            "four in turn %.0f\n",
            t.name, bytes, Median(copy_one), Median(copy_four));
      }
    }
    // Latency: 4 KiB, one at a time, in rounds that alternate ours and
    // ucx_perftest's (the VM's speed changes within seconds: a round
    // compares the two at about the same moment); the median round's
    // ratios count. Each round starts with 50 untimed round trips, as
    // ucx_perftest warms up: after the other's round both sides sleep.
    const Message proto = Echo(4096, 3);
    std::vector<double> median_ratios, mean_ratios, all_us;
    std::vector<std::string> round_lines;
    for (int round = 0; round < g_rounds; ++round) {
      for (int i = 0; i < 50; ++i) {
        (void)client->SendSync(address, Echo(4096, i), Ms(10000));
      }
      std::vector<double> each_us(g_round_trips);
      const auto start = Clock::now();
      for (int i = 0; i < g_round_trips; ++i) {
        Message m;
        m.header = proto.header;
        m.payload = proto.payload;
        const auto t0 = Clock::now();
        auto r = client->SendSync(address, std::move(m), Ms(10000));
        each_us[i] =
            std::chrono::duration<double, std::micro>(Clock::now() - t0)
                .count();
        ok = ok && r.ok() &&
             r->payload.num_bytes() == proto.payload.num_bytes() &&
             std::memcmp(r->payload.data(), proto.payload.data(),
                         proto.payload.num_bytes()) == 0;
      }
      const double mean_us =
          std::chrono::duration<double, std::micro>(Clock::now() - start)
              .count() /
          g_round_trips;
      all_us.insert(all_us.end(), each_us.begin(), each_us.end());
      const double median_us = Median(each_us);
      // Its "Final" row: column 1 the median one-way latency, 2 the mean.
      const std::vector<double> final_row =
          PerftestFinal(t.tls, "tag_lat", 4096, 20000);
      const double theirs_median = 2 * final_row[1];
      const double theirs_mean = 2 * final_row[2];
      median_ratios.push_back(theirs_median > 0 ? median_us / theirs_median
                                                : 0.0);
      mean_ratios.push_back(theirs_mean > 0 ? mean_us / theirs_mean : 0.0);
      char line[256];
      std::snprintf(line, sizeof(line),
                    "median %.2f us, ucx_perftest %.2f us: %.2fx; mean %.2f "
                    "us, ucx_perftest %.2f us: %.2fx",
                    median_us, theirs_median, median_ratios.back(), mean_us,
                    theirs_mean, mean_ratios.back());
      round_lines.push_back(line);
    }
    std::sort(all_us.begin(), all_us.end());
    const size_t n = all_us.size();
    std::printf(
        "%-6s 4 KiB round trip percentiles (all rounds): p10 %.2f us, p50 "
        "%.2f us, p90 %.2f us, p99 %.1f us, max %.1f us\n",
        t.name, all_us[n / 10], all_us[n / 2], all_us[n * 9 / 10],
        all_us[n * 99 / 100], all_us.back());
    for (size_t r = 0; r < round_lines.size(); ++r) {
      std::printf("%-6s 4 KiB round trip, round %zu: %s\n", t.name, r + 1,
                  round_lines[r].c_str());
    }
    std::printf(
        "%-6s 4 KiB round trip: median round %.2fx of ucx_perftest (target "
        "<= 2x), mean %.2fx\n",
        t.name, Median(median_ratios), Median(mean_ratios));
    client->Shutdown();
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    std::remove(file.c_str());
  }
  if (!ok) std::printf("VERIFY FAILED: an echo came back wrong or failed\n");
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace switchyard::transport

int main(int argc, char** argv) {
  namespace t = switchyard::transport;
  switchyard::InitLogging(argv[0]);
  t::g_self = argv[0];
  if (argc == 4 && std::strcmp(argv[1], "--serve") == 0) {
    return t::Serve(argv[2], argv[3]);
  }
  const char* usage =
      "usage: transport_bench [--latency | --bytes N] [--rounds N]\n"
      "                       [--transport shm|tcp] [--round-trips N]\n"
      "  --latency   the 4 KiB round trips only\n"
      "  --bytes N   the bandwidth rows of N-byte payloads only (a multiple\n"
      "              of 4096), then the round trips\n"
      "  --rounds N  rounds per bandwidth size and of round trips, each\n"
      "              ours then ucx_perftest's; the median round's ratio\n"
      "              is printed (default 3)\n"
      "  --transport shm|tcp\n"
      "              one transport only (default both)\n"
      "  --round-trips N\n"
      "              4 KiB round trips timed per round (default 2000)\n";
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (std::strcmp(argv[i], "--help") == 0) {
      std::printf("%s", usage);
      return 0;
    } else if (std::strcmp(argv[i], "--latency") == 0) {
      t::g_latency_only = true;
    } else if (has_value && std::strcmp(argv[i], "--bytes") == 0) {
      const long long n = std::atoll(argv[++i]);
      if (n <= 0 || n % 4096 != 0) {
        std::fprintf(stderr, "--bytes must be a positive multiple of 4096\n%s",
                     usage);
        return 2;
      }
      t::g_only_bytes = static_cast<size_t>(n);
    } else if (has_value && std::strcmp(argv[i], "--rounds") == 0) {
      t::g_rounds = std::atoi(argv[++i]);
      if (t::g_rounds < 1) {
        std::fprintf(stderr, "--rounds must be positive\n%s", usage);
        return 2;
      }
    } else if (has_value && std::strcmp(argv[i], "--transport") == 0) {
      t::g_transport = argv[++i];
      if (t::g_transport != "shm" && t::g_transport != "tcp") {
        std::fprintf(stderr, "--transport must be shm or tcp\n%s", usage);
        return 2;
      }
    } else if (has_value && std::strcmp(argv[i], "--round-trips") == 0) {
      t::g_round_trips = std::atoi(argv[++i]);
      if (t::g_round_trips < 10) {
        std::fprintf(stderr, "--round-trips must be at least 10\n%s", usage);
        return 2;
      }
    } else {
      std::fprintf(stderr, "unknown or incomplete flag '%s'\n%s", argv[i],
                   usage);
      return 2;
    }
  }
  if (t::g_latency_only && t::g_only_bytes != 0) {
    std::fprintf(stderr, "--latency and --bytes exclude each other\n%s", usage);
    return 2;
  }
  return t::Run();
}
