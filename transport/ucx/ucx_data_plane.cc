// DataPlane on UCX active messages (docs/protocol.md, "Data plane").
//
// One UCP context and worker per data plane. One thread at a time holds the
// "role" (role_mu_) and alone makes UCX calls: the progress thread, or a
// thread waiting in SendAndWait, which drives the network itself until its
// answers are in (the progress thread stands back meanwhile), so that an
// answer reaches its waiter without a thread hand-off; a waiter that finds
// the role free sends its requests itself. Other threads post commands for
// the role holder and wake it only when it sleeps. Requests go as
// AM kRequestAm with the 80-byte header and the payload as a separate buffer,
// with UCP_AM_SEND_FLAG_REPLY so the server answers on the same connection (AM
// kResponseAm). Payloads from rendezvous_threshold_bytes up are forced to
// rendezvous and received straight into the destination tensor. Endpoints use
// peer error handling: a lost peer fails every request pending on it.
// ucs_status_t becomes Status in UcxStatus() only. A client endpoint carries
// requests only once its wire-up has finished (its first flush), and processes
// of one host use shared memory and CMA (see NewUcxDataPlane).
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <ucp/api/ucp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <unordered_map>

#include "common/buffer_pool.h"
#include "common/metrics.h"
#include "common/thread_name.h"
#include "transport/data_plane.h"

namespace switchyard::transport {
namespace {

using Clock = std::chrono::steady_clock;

constexpr unsigned kRequestAm = 1;
constexpr unsigned kResponseAm = 2;
// Send contexts kept for reuse (each about 200 bytes).
constexpr size_t kIdleSendContexts = 1024;
// Drive: idle rounds between two looks at the clock (see Drive).
constexpr int kIdleRoundsPerCheck = 16;

Status UcxStatus(ucs_status_t s, const std::string& what, const char* file,
                 int line) {
  if (s == UCS_OK) return OkStatus();
  const std::string msg = what + ": " + ucs_status_string(s) + " [" + file +
                          ":" + std::to_string(line) + "]";
  switch (s) {
    case UCS_ERR_TIMED_OUT:
      return DeadlineExceededError(msg);
    case UCS_ERR_CANCELED:
      return CancelledError(msg);
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_EXCEEDS_LIMIT:
      return ResourceExhaustedError(msg);
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return InvalidArgumentError(msg);
    default:
      return UnavailableError(msg);
  }
}
#define UCX_STATUS(s, what) UcxStatus((s), (what), __FILE__, __LINE__)

StatusOr<sockaddr_storage> ResolveAddress(const std::string& host_port,
                                          socklen_t* len) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos) {
    return InvalidArgumentError("data-plane address '" + host_port +
                                "' is not host:port");
  }
  const std::string host = host_port.substr(0, colon);
  const std::string port = host_port.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* result = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &result) != 0 ||
      result == nullptr) {
    return InvalidArgumentError("cannot resolve data-plane address '" +
                                host_port + "'");
  }
  sockaddr_storage storage{};
  std::memcpy(&storage, result->ai_addr, result->ai_addrlen);
  *len = result->ai_addrlen;
  freeaddrinfo(result);
  return storage;
}

// "am=posix/memory rma_bw=cma/memory ...": the transports of `ep`'s lanes
// and what each carries, from ucp_ep_print_info's lane lines
// ("lane[1]:  3:posix/memory.0 md[2] -> ... am am_bw#0 keepalive").
std::string DescribeLanes(ucp_ep_h ep) {
  char* text = nullptr;
  size_t size = 0;
  FILE* out = ::open_memstream(&text, &size);
  if (out == nullptr) return "?";
  ucp_ep_print_info(ep, out);
  std::fclose(out);
  std::string described;
  std::istringstream lines(std::string(text, size));
  std::free(text);
  for (std::string line; std::getline(lines, line);) {
    const size_t lane = line.find("lane[");
    const size_t arrow = line.find("->");
    if (lane == std::string::npos || arrow == std::string::npos) continue;
    // The transport: "posix/memory" from " 3:posix/memory.0 md[2]".
    std::istringstream local(line.substr(line.find(':', lane) + 1));
    std::string resource;
    local >> resource;
    resource = resource.substr(resource.find(':') + 1);
    resource = resource.substr(0, resource.rfind('.'));
    // Its uses: the words after the remote md/transport/sysdev field.
    std::istringstream uses(line.substr(arrow + 2));
    std::string word;
    uses >> word;  // md[2]/posix/sysdev[255]
    while (uses >> word) {
      if (word == "am" || word.rfind("rma_bw", 0) == 0 ||
          word.rfind("am_bw", 0) == 0) {
        word = word.substr(0, word.find('#'));
        described += (described.empty() ? "" : " ") + word + "=" + resource;
      }
    }
  }
  return described.empty() ? "?" : described;
}

std::string SockaddrString(const sockaddr_storage& ss) {
  char host[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (ss.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    port = ntohs(in->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    port = ntohs(in6->sin6_port);
  }
  return std::string(host) + ":" + std::to_string(port);
}

class UcxDataPlane : public DataPlane {
 public:
  explicit UcxDataPlane(DataPlaneOptions options)
      : options_(std::move(options)),
        pool_(BufferPool::Create(options_.pool_cached_bytes)),
        metrics_requests_(MetricsRegistry::Global().GetCounter(
            "switchyard_data_plane_requests_total")),
        metrics_errors_(MetricsRegistry::Global().GetCounter(
            "switchyard_data_plane_rejected_total")) {}
  ~UcxDataPlane() override { Shutdown(); }

  Status Start(RequestHandler handler) override;
  void Shutdown() override;
  std::string address() const override { return address_; }
  void Send(const std::string& peer, Message request,
            std::chrono::milliseconds timeout, ResponseCallback done) override;
  bool SendAndWait(std::vector<SendRequest> requests,
                   std::unique_lock<std::mutex>& lock,
                   std::condition_variable& cv, Clock::time_point deadline,
                   const std::function<bool()>& done) override;
  std::string ConnectionInfo(const std::string& peer) const override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = lanes_.find(peer);
    return it == lanes_.end() ? "" : it->second;
  }

 private:
  // A request awaiting its answer, in slot (id & 0xffffffff) of pending_.
  struct Pending {
    uint64_t id = 0;  // 0: a free slot.
    ResponseCallback done;
    ucp_ep_h ep = nullptr;
    std::string peer;
  };
  struct EpInfo {
    std::string peer;
    bool client_side;
    // Client side: false until the endpoint's wire-up has finished (its
    // first flush completed). Sends wait in `parked` until then: UCX 1.13
    // fails an assertion when a rendezvous send queued during wire-up is
    // replayed on lanes that changed under it (TCP -> CMA).
    bool ready = true;
    std::vector<std::function<void()>> parked;
  };
  // A request whose rendezvous payload waits for in-flight bytes to drain.
  struct Deferred {
    WireHeader header;
    void* desc;
    ucp_ep_h reply_ep;
  };
  // Keeps a message's buffers alive until UCX is done sending it. Reused
  // (idle_send_contexts_).
  struct SendContext {
    UcxDataPlane* self;
    WireHeader header;
    Tensor payload;
    std::string text;
    // A request's id (its send failing completes it); 0 for a response.
    uint64_t request_id;
  };
  struct RecvContext {
    UcxDataPlane* self;
    WireHeader header;
    Tensor payload;
    ucp_ep_h reply_ep;
  };

  // Queues `fn` for the role holder; false once the plane is closed.
  bool Post(std::function<void()> fn);
  // Runs the posted commands (role holder). True when there were any.
  bool RunCommands();
  // Makes sure a role holder will run posted commands soon: signals one
  // sleeping on the worker's fd, or unparks the progress thread when no
  // waiter drives. mu_ held.
  void WakeLocked();
  void Loop();
  // One round of the role holder's work: posted commands and UCX progress
  // (deadlines are Drive's). True when anything happened. Progress stops early
  // once `finished` (when given) holds: one call can take a whole
  // rendezvous copy (a 16 MiB payload over CMA is about a millisecond), and
  // a waiter whose answer has come sends its next requests before the
  // copies of later answers, so that its peers are not left idle.
  // `*saw_finished` (when given) tells whether it stopped because of it.
  bool Round(const std::function<bool()>* finished = nullptr,
             bool* saw_finished = nullptr);
  // Drives UCX on the calling thread, which holds `role`, until
  // `finished()` or `until`: rounds back to back for busy_poll_us after any
  // activity, then one sleep on the worker's event fd, after which it
  // returns with the role released (the caller decides whether to take it
  // again). `finished()` is checked after every round that did something
  // (only such a round runs callbacks, which is what changes a waiter's
  // state) and every kIdleRoundsPerCheck idle rounds, when the clock, the
  // deadlines and `until` are checked too: an idle round is then a UCX
  // progress call and little else (a clock read here costs 30 ns, a
  // round about as much).
  void Drive(std::unique_lock<std::mutex>& role,
             const std::function<bool()>& finished, Clock::time_point until);
  // A waiter is done. The last one wakes the progress thread when work may
  // need it (`holding_role`: the caller holds the role and can tell).
  void LeaveWaiting(bool holding_role);
  // Anything that needs progress without a waiter: commands, requests in
  // flight either way, or peers that may send requests. Role and mu_ held.
  bool HasWorkLocked() const;
  // Completes the requests whose deadlines are past `now`; true when any.
  bool ExpireDeadlines(Clock::time_point now);
  // Registers a request awaiting its answer; returns its id.
  uint64_t AddPending(ResponseCallback done, Clock::time_point deadline,
                      ucp_ep_h ep, const std::string& peer);
  // Requests awaiting answers.
  size_t PendingCount() const { return pending_.size() - free_slots_.size(); }
  // The pending request `id`, or null (answered, expired, or never sent).
  Pending* FindPending(uint64_t id);
  void Complete(uint64_t id, StatusOr<Message> result);
  // Sends a request to `peer` (role holder): Send's work.
  void StartRequest(const std::string& peer, Message request,
                    Clock::time_point deadline, ResponseCallback done);
  StatusOr<ucp_ep_h> Endpoint(const std::string& peer);
  void TrackEndpoint(ucp_ep_h ep, EpInfo info);
  // The endpoint's wire-up flush finished: runs its parked sends, or drops
  // it (failing its requests) when `status` is an error.
  void EndpointReady(ucp_ep_h ep, ucs_status_t status);
  // Peer error handling: a lost peer fails every request pending on it.
  void SetPeerErrorHandling(ucp_ep_params_t* params);
  void DropEndpoint(ucp_ep_h ep, const Status& why);
  // Sends `message` as AM `am_id`; when it is the request `request_id`
  // (0: a response) and the send fails, completes that request.
  void SendMessage(ucp_ep_h ep, unsigned am_id, Message message,
                   uint64_t request_id);
  // UCX is done with `ctx`'s message (`status`): keeps ctx for reuse and
  // fails its request when the send failed.
  void SendDone(SendContext* ctx, ucs_status_t status);
  void ReplyTo(ucp_ep_h ep, const Message& request_header_only,
               const Status& error);
  void StartReceive(const WireHeader& header, void* desc, ucp_ep_h reply_ep);
  void Dispatch(WireHeader header, Tensor payload, ucp_ep_h reply_ep);
  void PumpDeferred();
  ucs_status_t OnRequest(const void* header, size_t header_length, void* data,
                         size_t length, const ucp_am_recv_param_t* param);
  ucs_status_t OnResponse(const void* header, size_t header_length, void* data,
                          size_t length, const ucp_am_recv_param_t* param);

  const DataPlaneOptions options_;
  // Received payloads land in reused buffers, never fresh pages.
  std::shared_ptr<BufferPool> pool_;
  Counter* metrics_requests_;
  Counter* metrics_errors_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_listener_h listener_ = nullptr;
  int efd_ = -1;
  std::string address_;
  RequestHandler handler_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::once_flag shutdown_once_;

  // The role: its holder alone calls UCX (the worker is
  // UCS_THREAD_MODE_SERIALIZED).
  std::mutex role_mu_;
  // The thread holding the role while awake (replies from it are sent at
  // once, not posted).
  std::atomic<std::thread::id> role_holder_;

  mutable std::mutex mu_;
  std::vector<std::function<void()>> commands_;  // GUARDED_BY(mu_)
  // commands_ is not empty (read without mu_ by the role holder's rounds).
  std::atomic<bool> has_commands_{false};
  std::map<std::string, std::string> lanes_;  // GUARDED_BY(mu_)
  // No progress thread runs commands: not started yet, or shut down.
  bool closed_ = true;  // GUARDED_BY(mu_)
  // Threads in SendAndWait (written under mu_; the progress thread stands
  // back while any).
  std::atomic<int> waiters_{0};
  int sleepers_ = 0;     // GUARDED_BY(mu_): role holders in poll()
  bool parked_ = false;  // GUARDED_BY(mu_): the progress thread stands back
  bool kicked_ = false;  // GUARDED_BY(mu_)
  std::condition_variable park_cv_;

  // Role holder only.
  std::map<std::string, ucp_ep_h> client_eps_;
  std::unordered_map<ucp_ep_h, EpInfo> eps_;
  // Commands being run (RunCommands), kept for their capacity.
  std::vector<std::function<void()>> running_;
  // Requests awaiting answers: slots reused through free_slots_, so that a
  // request allocates nothing here once the plane is warm.
  std::vector<Pending> pending_;
  std::vector<uint32_t> free_slots_;
  // Min-heap of (deadline, request id). Entries of answered requests stay
  // until they surface (or the heap is rebuilt from pending_ when mostly
  // stale): answering does not search it.
  std::vector<std::pair<Clock::time_point, uint64_t>> deadlines_;
  uint64_t next_sequence_ = 1;
  std::vector<std::unique_ptr<SendContext>> idle_send_contexts_;
  size_t inflight_bytes_ = 0;
  std::deque<Deferred> deferred_;
};

Status UcxDataPlane::Start(RequestHandler handler) {
  handler_ = std::move(handler);
  const std::string& tls = options_.ucx_tls;
  if (!tls.empty() && tls.find("tcp") == std::string::npos &&
      tls.find("all") == std::string::npos) {
    return InvalidArgumentError(
        "transport.ucx_tls '" + tls +
        "' has no tcp: UCX 1.13 sets up client-server connections over TCP; "
        "add tcp (shared memory is still used between local processes)");
  }
  ucp_config_t* config = nullptr;
  RETURN_IF_ERROR(UCX_STATUS(ucp_config_read(nullptr, nullptr, &config),
                             "ucp_config_read"));
  if (!options_.ucx_tls.empty()) {
    ucs_status_t s = ucp_config_modify(config, "TLS", options_.ucx_tls.c_str());
    if (s != UCS_OK) {
      ucp_config_release(config);
      return UCX_STATUS(s, "UCX_TLS=" + options_.ucx_tls);
    }
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  ucs_status_t s = ucp_init(&params, config, &context_);
  ucp_config_release(config);
  RETURN_IF_ERROR(UCX_STATUS(s, "ucp_init"));

  ucp_worker_params_t wparams{};
  wparams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wparams.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  RETURN_IF_ERROR(UCX_STATUS(ucp_worker_create(context_, &wparams, &worker_),
                             "ucp_worker_create"));
  RETURN_IF_ERROR(
      UCX_STATUS(ucp_worker_get_efd(worker_, &efd_), "ucp_worker_get_efd"));

  for (unsigned id : {kRequestAm, kResponseAm}) {
    ucp_am_handler_param_t am{};
    am.field_mask =
        UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
        UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    am.id = id;
    am.flags = UCP_AM_FLAG_WHOLE_MSG;
    am.arg = this;
    am.cb = id == kRequestAm
                ? [](void* arg, const void* h, size_t hl, void* d, size_t l,
                     const ucp_am_recv_param_t* p) {
                    return static_cast<UcxDataPlane*>(arg)->OnRequest(h, hl, d,
                                                                      l, p);
                  }
                : [](void* arg, const void* h, size_t hl, void* d, size_t l,
                     const ucp_am_recv_param_t* p) {
                    return static_cast<UcxDataPlane*>(arg)->OnResponse(h, hl, d,
                                                                       l, p);
                  };
    RETURN_IF_ERROR(UCX_STATUS(ucp_worker_set_am_recv_handler(worker_, &am),
                               "ucp_worker_set_am_recv_handler"));
  }

  socklen_t len = 0;
  ASSIGN_OR_RETURN(sockaddr_storage listen_addr,
                   ResolveAddress(options_.listen_host + ":0", &len));
  ucp_listener_params_t lparams{};
  lparams.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR |
                       UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lparams.sockaddr.addr = reinterpret_cast<const sockaddr*>(&listen_addr);
  lparams.sockaddr.addrlen = len;
  lparams.conn_handler.arg = this;
  lparams.conn_handler.cb = [](ucp_conn_request_h request, void* arg) {
    auto* self = static_cast<UcxDataPlane*>(arg);
    ucp_conn_request_attr_t attr{};
    attr.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
    std::string peer = "?";
    if (ucp_conn_request_query(request, &attr) == UCS_OK) {
      peer = SockaddrString(attr.client_address);
    }
    ucp_ep_params_t ep_params{};
    ep_params.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST;
    ep_params.conn_request = request;
    self->SetPeerErrorHandling(&ep_params);
    ucp_ep_h ep = nullptr;
    const ucs_status_t s = ucp_ep_create(self->worker_, &ep_params, &ep);
    if (s != UCS_OK) {
      LOG(WARNING) << "data plane: cannot accept " << peer << ": "
                   << ucs_status_string(s);
      return;
    }
    self->TrackEndpoint(ep, {peer, /*client_side=*/false, /*ready=*/true, {}});
  };
  RETURN_IF_ERROR(UCX_STATUS(ucp_listener_create(worker_, &lparams, &listener_),
                             "ucp_listener_create"));
  ucp_listener_attr_t lattr{};
  lattr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  RETURN_IF_ERROR(
      UCX_STATUS(ucp_listener_query(listener_, &lattr), "ucp_listener_query"));
  const std::string bound = SockaddrString(lattr.sockaddr);
  address_ = options_.listen_host + bound.substr(bound.rfind(':'));
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = false;
  }
  thread_ = StartNamedThread("sy-ucx", [this] { Loop(); });
  LOG(INFO) << "data plane: UCX listening on " << address_;
  return OkStatus();
}

bool UcxDataPlane::Post(std::function<void()> fn) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return false;
  commands_.push_back(std::move(fn));
  has_commands_.store(true, std::memory_order_release);
  WakeLocked();
  return true;
}

bool UcxDataPlane::RunCommands() {
  if (!has_commands_.load(std::memory_order_acquire)) return false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    running_.swap(commands_);
    has_commands_.store(false, std::memory_order_relaxed);
  }
  for (auto& c : running_) c();
  const bool ran = !running_.empty();
  running_.clear();
  return ran;
}

void UcxDataPlane::WakeLocked() {
  // Signal under mu_: the worker is destroyed only after closed_.
  if (sleepers_ > 0) {
    ucp_worker_signal(worker_);
  } else if (parked_ && waiters_.load() == 0) {
    kicked_ = true;
    park_cv_.notify_one();
  }
  // Otherwise a role holder is awake (it runs commands every round; one
  // about to sleep checks for them under mu_ first) or a waiter is about
  // to drive.
}

bool UcxDataPlane::Round(const std::function<bool()>* finished,
                         bool* saw_finished) {
  bool active = RunCommands();
  while (ucp_worker_progress(worker_) != 0) {
    active = true;
    if (finished != nullptr && (*finished)()) {
      if (saw_finished != nullptr) *saw_finished = true;
      break;
    }
  }
  return active;
}

void UcxDataPlane::Drive(std::unique_lock<std::mutex>& role,
                         const std::function<bool()>& finished,
                         Clock::time_point until) {
  const auto busy_poll = std::chrono::microseconds(options_.busy_poll_us);
  auto last_activity = Clock::now();
  int idle_rounds = 0;
  role_holder_.store(std::this_thread::get_id());
  while (true) {
    bool saw_finished = false;
    bool active = Round(&finished, &saw_finished);
    if (saw_finished) break;  // An answer came: no clock read on its way.
    if (!active && ++idle_rounds < kIdleRoundsPerCheck) continue;
    idle_rounds = 0;
    const auto now = Clock::now();
    active = ExpireDeadlines(now) || active;
    if (finished()) break;
    if (now >= until) break;
    if (active) last_activity = now;
    if (now - last_activity < busy_poll) continue;
    if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!commands_.empty()) continue;
      ++sleepers_;
    }
    auto wake = std::min(until, now + std::chrono::milliseconds(100));
    if (!deadlines_.empty()) wake = std::min(wake, deadlines_.front().first);
    const int wait_ms = std::clamp<int>(
        static_cast<int>(
            std::chrono::duration_cast<std::chrono::milliseconds>(wake - now)
                .count()) +
            1,
        0, 100);
    role_holder_.store(std::thread::id());
    role.unlock();
    pollfd pfd{efd_, POLLIN, 0};
    ::poll(&pfd, 1, wait_ms);
    std::lock_guard<std::mutex> lock(mu_);
    --sleepers_;
    return;
  }
  role_holder_.store(std::thread::id());
}

void UcxDataPlane::Loop() {
  // The progress thread parks while a waiter drives. When the last waiter
  // leaves work behind (HasWorkLocked) it unparks the thread; otherwise
  // the thread looks for stray events (a new connection, say) on its own,
  // without arming the worker, every park_for, doubling while idle: an
  // armed worker would wake it for every event of the next waiter's round
  // trips, on the core that the round trip's other end needs.
  constexpr auto kParkMin = std::chrono::milliseconds(1);
  constexpr auto kParkMax = std::chrono::milliseconds(64);
  auto park_for = kParkMin;
  bool look_only = false;
  while (!stop_.load()) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (waiters_.load() > 0 || look_only) {
        parked_ = true;
        const bool kicked = park_cv_.wait_for(
            lock, park_for, [this] { return kicked_ || stop_.load(); });
        parked_ = kicked_ = false;
        if (kicked) {
          look_only = false;
          park_for = kParkMin;
        } else {
          look_only = true;
          park_for = std::min(park_for * 2, kParkMax);
        }
        if (waiters_.load() > 0) continue;
      }
    }
    std::unique_lock<std::mutex> role(role_mu_, std::try_to_lock);
    if (!role.owns_lock()) {  // A waiter on its way out.
      ::sched_yield();
      continue;
    }
    if (look_only) {
      Round();
      ExpireDeadlines(Clock::now());
      std::lock_guard<std::mutex> lock(mu_);
      if (!HasWorkLocked()) continue;
      look_only = false;
      park_for = kParkMin;
    }
    Drive(
        role, [this] { return stop_.load() || waiters_.load() > 0; },
        Clock::time_point::max());
    // A waiter arrived: it drives and this thread parks (look_only stays
    // false: the last waiter unparks it when work is left).
  }
  std::unique_lock<std::mutex> role(role_mu_);
  // Shutting down: run what was posted (sends see stop_ and cancel), refuse
  // further posts, fail what is pending, close endpoints, release UCX.
  while (true) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (commands_.empty()) {
        closed_ = true;
        break;
      }
    }
    RunCommands();
  }
  std::vector<uint64_t> cancelled;
  for (const Pending& p : pending_) {
    if (p.id != 0) cancelled.push_back(p.id);
  }
  for (uint64_t id : cancelled) {
    Complete(id, CancelledError("data plane shutting down"));
  }
  deadlines_.clear();
  for (auto& d : deferred_) ucp_am_data_release(worker_, d.desc);
  deferred_.clear();
  std::vector<void*> closing;
  for (auto& [ep, info] : eps_) {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* req = ucp_ep_close_nbx(ep, &param);
    if (UCS_PTR_IS_PTR(req)) closing.push_back(req);
  }
  eps_.clear();
  client_eps_.clear();
  // Bounded: never block shutdown on the network.
  const auto limit = Clock::now() + std::chrono::milliseconds(500);
  for (void* req : closing) {
    while (ucp_request_check_status(req) == UCS_INPROGRESS &&
           Clock::now() < limit) {
      ucp_worker_progress(worker_);
    }
    ucp_request_free(req);
  }
  if (listener_ != nullptr) ucp_listener_destroy(listener_);
  ucp_worker_destroy(worker_);
  ucp_cleanup(context_);
  listener_ = nullptr;
  worker_ = nullptr;
  context_ = nullptr;
}

bool UcxDataPlane::HasWorkLocked() const {
  if (!commands_.empty() || PendingCount() > 0 || !deferred_.empty() ||
      inflight_bytes_ > 0) {
    return true;
  }
  for (const auto& [ep, info] : eps_) {
    if (!info.client_side) return true;  // A peer that sends us requests.
  }
  return false;
}

void UcxDataPlane::LeaveWaiting(bool holding_role) {
  std::lock_guard<std::mutex> lock(mu_);
  if (waiters_.fetch_sub(1) > 1 || closed_) return;
  if (holding_role && !HasWorkLocked()) return;
  if (sleepers_ > 0) ucp_worker_signal(worker_);
  kicked_ = true;
  park_cv_.notify_one();
}

bool UcxDataPlane::SendAndWait(std::vector<SendRequest> requests,
                               std::unique_lock<std::mutex>& lock,
                               std::condition_variable& cv,
                               Clock::time_point deadline,
                               const std::function<bool()>& done) {
  // While the role holder is busy (the progress thread finishing a round),
  // retry this long, giving the core away between tries, before waiting
  // on `cv` for a while between tries (another waiter drives).
  constexpr auto kRoleSpin = std::chrono::microseconds(50);
  constexpr auto kRoleRetry = std::chrono::microseconds(200);
  lock.unlock();
  bool running = false;
  {
    // From here on posted commands need no wake-up: this thread runs them.
    std::lock_guard<std::mutex> guard(mu_);
    running = !closed_;
    if (running) waiters_.fetch_add(1);
  }
  if (!running) {  // Not started, or shut down: every Send fails at once.
    lock.lock();
    return DataPlane::SendAndWait(std::move(requests), lock, cv, deadline,
                                  done);
  }
  std::unique_lock<std::mutex> role(role_mu_, std::try_to_lock);
  if (role.owns_lock()) {
    // Holding the role, send directly instead of posting commands (each a
    // closure and a queue entry); what was posted before goes first, so
    // that requests from one thread keep their order.
    RunCommands();
    const auto now = Clock::now();
    for (SendRequest& r : requests) {
      StartRequest(r.peer, std::move(r.message), now + r.timeout,
                   std::move(r.done));
    }
  } else {
    for (SendRequest& r : requests) {
      Send(r.peer, std::move(r.message), r.timeout, std::move(r.done));
    }
  }
  std::optional<Clock::time_point> spin_until;  // Read when first needed.
  while (true) {
    if (role.owns_lock() || role.try_lock()) {
      bool finished = stop_.load();
      if (!finished) {
        Drive(
            role,
            [&] {
              std::lock_guard<std::mutex> relock(*lock.mutex());
              finished = stop_.load() || done();
              return finished;
            },
            deadline);
      }
      if (finished) {
        LeaveWaiting(/*holding_role=*/true);
        role.unlock();
        lock.lock();
        // Shutting down completes every request.
        return stop_.load() ? cv.wait_until(lock, deadline, done) : done();
      }
      if (!role.owns_lock()) continue;  // It slept on the worker's fd.
      role.unlock();                    // Past the deadline.
    }
    lock.lock();
    const auto now = Clock::now();
    if (done() || now >= deadline) {
      LeaveWaiting(/*holding_role=*/false);
      return done();
    }
    if (!spin_until) spin_until = now + kRoleSpin;
    if (now < *spin_until) {
      lock.unlock();
      ::sched_yield();
      continue;
    }
    cv.wait_until(lock, std::min(deadline, now + kRoleRetry));
    lock.unlock();
  }
}

void UcxDataPlane::Shutdown() {
  std::call_once(shutdown_once_, [this] {
    if (!thread_.joinable()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        closed_ = true;
      }
      if (listener_ != nullptr) ucp_listener_destroy(listener_);
      if (worker_ != nullptr) ucp_worker_destroy(worker_);
      if (context_ != nullptr) ucp_cleanup(context_);
      return;
    }
    stop_.store(true);
    {
      // The progress thread destroys the worker only after setting closed_.
      std::lock_guard<std::mutex> lock(mu_);
      if (!closed_) ucp_worker_signal(worker_);
      kicked_ = true;
      park_cv_.notify_all();
    }
    thread_.join();
  });
}

bool UcxDataPlane::ExpireDeadlines(Clock::time_point now) {
  bool expired = false;
  const auto later = std::greater<>();
  while (!deadlines_.empty() && deadlines_.front().first <= now) {
    std::pop_heap(deadlines_.begin(), deadlines_.end(), later);
    const uint64_t id = deadlines_.back().second;
    deadlines_.pop_back();
    const Pending* p = FindPending(id);
    if (p == nullptr) continue;  // Answered before its deadline.
    Complete(id, DeadlineExceededError("no data-plane response from " +
                                       p->peer + " by the deadline"));
    expired = true;
  }
  return expired;
}

uint64_t UcxDataPlane::AddPending(ResponseCallback done,
                                  Clock::time_point deadline, ucp_ep_h ep,
                                  const std::string& peer) {
  if (free_slots_.empty()) {
    free_slots_.push_back(static_cast<uint32_t>(pending_.size()));
    pending_.emplace_back();
  }
  const uint32_t slot = free_slots_.back();
  free_slots_.pop_back();
  const uint64_t id = (next_sequence_++ << 32) | slot;
  Pending& p = pending_[slot];
  p.id = id;
  p.done = std::move(done);
  p.ep = ep;
  p.peer = peer;
  const auto later = std::greater<>();
  if (deadlines_.size() >= 2 * PendingCount() + 64) {
    // Mostly answered requests: keep the live ones' entries only.
    std::vector<std::pair<Clock::time_point, uint64_t>> live;
    for (const auto& entry : deadlines_) {
      if (FindPending(entry.second) != nullptr) live.push_back(entry);
    }
    deadlines_.swap(live);
    std::make_heap(deadlines_.begin(), deadlines_.end(), later);
  }
  deadlines_.emplace_back(deadline, id);
  std::push_heap(deadlines_.begin(), deadlines_.end(), later);
  return id;
}

UcxDataPlane::Pending* UcxDataPlane::FindPending(uint64_t id) {
  const uint64_t slot = id & 0xffffffffu;
  if (id == 0 || slot >= pending_.size() || pending_[slot].id != id) {
    return nullptr;
  }
  return &pending_[slot];
}

void UcxDataPlane::Complete(uint64_t id, StatusOr<Message> result) {
  Pending* p = FindPending(id);
  if (p == nullptr) return;
  ResponseCallback done = std::move(p->done);
  p->id = 0;
  p->done = nullptr;
  p->ep = nullptr;
  free_slots_.push_back(static_cast<uint32_t>(id & 0xffffffffu));
  done(std::move(result));
}

void UcxDataPlane::TrackEndpoint(ucp_ep_h ep, EpInfo info) {
  eps_[ep] = std::move(info);
}

void UcxDataPlane::EndpointReady(ucp_ep_h ep, ucs_status_t status) {
  auto it = eps_.find(ep);
  if (it == eps_.end()) return;  // Dropped meanwhile; its requests failed.
  if (status != UCS_OK) {
    DropEndpoint(
        ep, UCX_STATUS(status, "connect to data plane at " + it->second.peer));
    return;
  }
  it->second.ready = true;
  const std::string lanes = DescribeLanes(ep);
  LOG(INFO) << "data plane: connected to " << it->second.peer << " over "
            << lanes;
  {
    std::lock_guard<std::mutex> lock(mu_);
    lanes_[it->second.peer] = lanes;
  }
  std::vector<std::function<void()>> parked = std::move(it->second.parked);
  for (auto& send : parked) send();
}

void UcxDataPlane::DropEndpoint(ucp_ep_h ep, const Status& why) {
  auto it = eps_.find(ep);
  if (it == eps_.end()) return;
  const EpInfo info = it->second;
  eps_.erase(it);
  if (info.client_side) {
    client_eps_.erase(info.peer);
    std::lock_guard<std::mutex> lock(mu_);
    lanes_.erase(info.peer);  // ConnectionInfo: no connection now.
  }
  std::vector<uint64_t> failed;
  for (const Pending& p : pending_) {
    if (p.id != 0 && p.ep == ep) failed.push_back(p.id);
  }
  // A peer that goes away with nothing pending is ordinary (a trainer or
  // test client shutting down); one that takes requests with it is not.
  if (failed.empty()) {
    VLOG(1) << "data plane: connection with " << info.peer
            << " closed: " << why.ToString();
  } else {
    LOG(WARNING) << "data plane: connection with " << info.peer << " lost with "
                 << failed.size() << " requests pending: " << why.ToString();
  }
  for (uint64_t id : failed) {
    Complete(id, UnavailableError("data-plane peer " + info.peer +
                                  " lost: " + why.message()));
  }
  // Close outside the error callback.
  Post([this, ep] {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* req = ucp_ep_close_nbx(ep, &param);
    if (UCS_PTR_IS_PTR(req)) ucp_request_free(req);
  });
}

void UcxDataPlane::SetPeerErrorHandling(ucp_ep_params_t* params) {
  params->field_mask |=
      UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params->err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params->err_handler.arg = this;
  params->err_handler.cb = [](void* arg, ucp_ep_h ep, ucs_status_t s) {
    static_cast<UcxDataPlane*>(arg)->DropEndpoint(
        ep, UCX_STATUS(s, "data-plane peer lost"));
  };
}

StatusOr<ucp_ep_h> UcxDataPlane::Endpoint(const std::string& peer) {
  auto it = client_eps_.find(peer);
  if (it != client_eps_.end()) return it->second;
  socklen_t len = 0;
  ASSIGN_OR_RETURN(sockaddr_storage addr, ResolveAddress(peer, &len));
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR;
  params.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  params.sockaddr.addrlen = len;
  SetPeerErrorHandling(&params);
  ucp_ep_h ep = nullptr;
  RETURN_IF_ERROR(UCX_STATUS(ucp_ep_create(worker_, &params, &ep),
                             "connect to data plane at " + peer));
  client_eps_[peer] = ep;
  TrackEndpoint(ep, {peer, /*client_side=*/true, /*ready=*/false, {}});
  struct FlushContext {
    UcxDataPlane* self;
    ucp_ep_h ep;
  };
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.user_data = new FlushContext{this, ep};
  param.cb.send = [](void* request, ucs_status_t status, void* user_data) {
    auto* c = static_cast<FlushContext*>(user_data);
    // Sent outside UCX's callback, as posted commands.
    UcxDataPlane* self = c->self;
    ucp_ep_h flushed = c->ep;
    self->Post(
        [self, flushed, status] { self->EndpointReady(flushed, status); });
    delete c;
    ucp_request_free(request);
  };
  ucs_status_ptr_t flush = ucp_ep_flush_nbx(ep, &param);
  if (!UCS_PTR_IS_PTR(flush)) {
    delete static_cast<FlushContext*>(param.user_data);
    EndpointReady(ep, UCS_PTR_STATUS(flush));
  }
  return ep;
}

void UcxDataPlane::SendMessage(ucp_ep_h ep, unsigned am_id, Message message,
                               uint64_t request_id) {
  SendContext* ctx = nullptr;
  if (idle_send_contexts_.empty()) {
    ctx = new SendContext{this, {}, {}, {}, 0};
  } else {
    ctx = idle_send_contexts_.back().release();
    idle_send_contexts_.pop_back();
  }
  ctx->header = message.header;
  ctx->payload = std::move(message.payload);
  ctx->text = std::move(message.error_text);
  ctx->request_id = request_id;
  const void* buffer = nullptr;
  size_t bytes = 0;
  if (!ctx->payload.empty()) {
    buffer = ctx->payload.data();
    bytes = ctx->payload.num_bytes();
  } else if (!ctx->text.empty()) {
    buffer = ctx->text.data();
    bytes = ctx->text.size();
  }
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK |
                       UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_AM_SEND_FLAG_REPLY;
  if (bytes >= options_.rendezvous_threshold_bytes) {
    param.flags |= UCP_AM_SEND_FLAG_RNDV;
  }
  param.user_data = ctx;
  param.cb.send = [](void* request, ucs_status_t status, void* user_data) {
    auto* c = static_cast<SendContext*>(user_data);
    c->self->SendDone(c, status);
    ucp_request_free(request);
  };
  ucs_status_ptr_t req = ucp_am_send_nbx(
      ep, am_id, &ctx->header, sizeof(WireHeader), buffer, bytes, &param);
  if (req == nullptr || UCS_PTR_IS_ERR(req)) SendDone(ctx, UCS_PTR_STATUS(req));
}

void UcxDataPlane::SendDone(SendContext* ctx, ucs_status_t status) {
  const uint64_t request_id = ctx->request_id;
  ctx->payload = Tensor();
  ctx->text.clear();
  if (idle_send_contexts_.size() < kIdleSendContexts) {
    idle_send_contexts_.emplace_back(ctx);
  } else {
    delete ctx;
  }
  if (status == UCS_OK || request_id == 0) return;
  const Pending* p = FindPending(request_id);
  if (p == nullptr) return;
  Complete(request_id, UCX_STATUS(status, "send to data plane at " + p->peer));
}

void UcxDataPlane::Send(const std::string& peer, Message request,
                        std::chrono::milliseconds timeout,
                        ResponseCallback done) {
  const auto deadline = Clock::now() + timeout;
  auto shared_done = std::make_shared<ResponseCallback>(std::move(done));
  const bool posted = Post([this, peer, request = std::move(request), deadline,
                            shared_done]() mutable {
    StartRequest(peer, std::move(request), deadline, std::move(*shared_done));
  });
  if (!posted) {
    (*shared_done)(
        CancelledError("data plane is not running (not started, "
                       "or shut down)"));
  }
}

void UcxDataPlane::StartRequest(const std::string& peer, Message request,
                                Clock::time_point deadline,
                                ResponseCallback done) {
  if (stop_.load()) {
    done(CancelledError("data plane shutting down"));
    return;
  }
  StatusOr<ucp_ep_h> ep = Endpoint(peer);
  if (!ep.ok()) {
    done(UnavailableError(ep.status().message()));
    return;
  }
  const uint64_t id = AddPending(std::move(done), deadline, *ep, peer);
  request.header.request_id = id;
  request.header.status_code = 0;
  auto info = eps_.find(*ep);
  if (info == eps_.end()) {  // Its wire-up failed at once.
    Complete(id, UnavailableError("cannot connect to data plane at " + peer));
    return;
  }
  if (info->second.ready) {
    SendMessage(*ep, kRequestAm, std::move(request), id);
    return;
  }
  info->second.parked.push_back(
      [this, ep = *ep, id, request = std::move(request)]() mutable {
        if (FindPending(id) == nullptr) return;  // Expired while parked.
        SendMessage(ep, kRequestAm, std::move(request), id);
      });
}

void UcxDataPlane::ReplyTo(ucp_ep_h ep, const Message& request,
                           const Status& error) {
  metrics_errors_->Increment();
  if (ep == nullptr || !eps_.count(ep)) return;
  SendMessage(ep, kResponseAm, ErrorResponse(request.header, error), 0);
}

ucs_status_t UcxDataPlane::OnRequest(const void* header, size_t header_length,
                                     void* data, size_t length,
                                     const ucp_am_recv_param_t* param) {
  metrics_requests_->Increment();
  const bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
  ucp_ep_h reply_ep = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP)
                          ? param->reply_ep
                          : nullptr;
  // Who sent it, for the log (looked up only when something is wrong).
  auto peer = [&]() -> std::string {
    auto it = reply_ep ? eps_.find(reply_ep) : eps_.end();
    return it == eps_.end() ? "?" : it->second.peer;
  };
  if (header_length != sizeof(WireHeader)) {
    LOG(WARNING) << "data plane: dropping a request from " << peer()
                 << " with a " << header_length << "-byte header (expected "
                 << sizeof(WireHeader) << ")";
    metrics_errors_->Increment();
    return UCS_OK;  // Nothing to answer to: the request id is unknown.
  }
  Message request;
  std::memcpy(&request.header, header, sizeof(WireHeader));
  Status valid = ValidateHeader(request.header, header_length, length,
                                options_.max_payload_bytes);
  if (!valid.ok()) {
    LOG(WARNING) << "data plane: refusing a request from " << peer() << ": "
                 << valid.message();
    ReplyTo(reply_ep, request, valid);
    return UCS_OK;
  }
  if (!rndv) {
    Tensor payload;
    if (request.header.dtype != kNoDType) {
      auto t = pool_->Take(static_cast<DType>(request.header.dtype),
                           {request.header.rows, request.header.cols});
      if (!t.ok()) {
        ReplyTo(reply_ep, request, t.status());
        return UCS_OK;
      }
      payload = std::move(t).value();
      if (length > 0) std::memcpy(payload.data(), data, length);
    }
    inflight_bytes_ += length;
    Dispatch(request.header, std::move(payload), reply_ep);
    return UCS_OK;
  }
  if (inflight_bytes_ > 0 &&
      inflight_bytes_ + length > options_.max_inflight_bytes) {
    // Backpressure: leave the payload with the sender until bytes drain.
    deferred_.push_back({request.header, data, reply_ep});
    return UCS_INPROGRESS;
  }
  StartReceive(request.header, data, reply_ep);
  return UCS_INPROGRESS;
}

void UcxDataPlane::StartReceive(const WireHeader& header, void* desc,
                                ucp_ep_h reply_ep) {
  Message request_header;
  request_header.header = header;
  auto t =
      pool_->Take(static_cast<DType>(header.dtype), {header.rows, header.cols});
  if (!t.ok()) {
    ucp_am_data_release(worker_, desc);
    ReplyTo(reply_ep, request_header, t.status());
    return;
  }
  inflight_bytes_ += header.payload_bytes;
  auto* ctx = new RecvContext{this, header, std::move(t).value(), reply_ep};
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.user_data = ctx;
  param.cb.recv_am = [](void* request, ucs_status_t status, size_t,
                        void* user_data) {
    auto* c = static_cast<RecvContext*>(user_data);
    if (status == UCS_OK) {
      c->self->Dispatch(c->header, std::move(c->payload), c->reply_ep);
    } else {
      c->self->inflight_bytes_ -= c->header.payload_bytes;
      Message m;
      m.header = c->header;
      c->self->ReplyTo(c->reply_ep, m,
                       UCX_STATUS(status, "receive request payload"));
    }
    delete c;
    ucp_request_free(request);
  };
  ucs_status_ptr_t req = ucp_am_recv_data_nbx(
      worker_, desc, ctx->payload.data(), header.payload_bytes, &param);
  if (req == nullptr) {
    Dispatch(ctx->header, std::move(ctx->payload), reply_ep);
    delete ctx;
  } else if (UCS_PTR_IS_ERR(req)) {
    inflight_bytes_ -= header.payload_bytes;
    ReplyTo(reply_ep, request_header,
            UCX_STATUS(UCS_PTR_STATUS(req), "receive request payload"));
    delete ctx;
  }
}

void UcxDataPlane::PumpDeferred() {
  while (!deferred_.empty() &&
         (inflight_bytes_ == 0 ||
          inflight_bytes_ + deferred_.front().header.payload_bytes <=
              options_.max_inflight_bytes)) {
    Deferred d = deferred_.front();
    deferred_.pop_front();
    if (!eps_.count(d.reply_ep)) {
      ucp_am_data_release(worker_, d.desc);
      continue;
    }
    StartReceive(d.header, d.desc, d.reply_ep);
  }
}

void UcxDataPlane::Dispatch(WireHeader header, Tensor payload,
                            ucp_ep_h reply_ep) {
  Message request;
  request.header = header;
  request.payload = std::move(payload);
  const size_t bytes = header.payload_bytes;
  auto answered = std::make_shared<std::atomic<bool>>(false);
  Reply reply = [this, reply_ep, bytes, answered,
                 request_id = header.request_id](Message response) {
    if (answered->exchange(true)) {
      LOG(ERROR) << "data plane: request " << request_id
                 << " answered twice; ignoring the second reply";
      return;
    }
    response.header.request_id = request_id;
    auto send = [this, reply_ep, bytes,
                 response = std::move(response)]() mutable {
      inflight_bytes_ -= bytes;
      if (eps_.count(reply_ep)) {
        SendMessage(reply_ep, kResponseAm, std::move(response), 0);
      }
      PumpDeferred();
    };
    // From the handler itself, on the role holder: at once.
    if (role_holder_.load() == std::this_thread::get_id()) {
      send();
    } else {
      Post(std::move(send));
    }
  };
  if (!handler_) {
    reply(ErrorResponse(
        header, FailedPreconditionError("this data plane serves no requests")));
    return;
  }
  handler_(std::move(request), std::move(reply));
}

ucs_status_t UcxDataPlane::OnResponse(const void* header, size_t header_length,
                                      void* data, size_t length,
                                      const ucp_am_recv_param_t* param) {
  if (header_length != sizeof(WireHeader)) {
    LOG(WARNING) << "data plane: dropping a response with a " << header_length
                 << "-byte header";
    return UCS_OK;
  }
  WireHeader h;
  std::memcpy(&h, header, sizeof(h));
  if (FindPending(h.request_id) == nullptr) {
    VLOG(1) << "data plane: late response " << h.request_id;
    return UCS_OK;  // Timed out already; a rendezvous payload is dropped.
  }
  Status valid =
      ValidateHeader(h, header_length, length, options_.max_payload_bytes);
  if (!valid.ok()) {
    Complete(h.request_id, valid.WithContext("malformed response"));
    return UCS_OK;
  }
  if (h.status_code != 0) {
    std::string text;
    if (!(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
      text.assign(static_cast<const char*>(data), length);
    }
    Complete(h.request_id,
             Status(static_cast<StatusCode>(h.status_code), text));
    return UCS_OK;
  }
  Message response;
  response.header = h;
  if (h.dtype != kNoDType) {
    auto t = pool_->Take(static_cast<DType>(h.dtype), {h.rows, h.cols});
    if (!t.ok()) {
      Complete(h.request_id, t.status());
      return UCS_OK;
    }
    response.payload = std::move(t).value();
  }
  if (!(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
    if (length > 0) std::memcpy(response.payload.data(), data, length);
    Complete(h.request_id, std::move(response));
    return UCS_OK;
  }
  struct Ctx {
    UcxDataPlane* self;
    Message response;
  };
  auto* ctx = new Ctx{this, std::move(response)};
  ucp_request_param_t rparam{};
  rparam.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  rparam.user_data = ctx;
  rparam.cb.recv_am = [](void* request, ucs_status_t status, size_t,
                         void* user_data) {
    auto* c = static_cast<Ctx*>(user_data);
    const uint64_t id = c->response.header.request_id;
    if (status == UCS_OK) {
      c->self->Complete(id, std::move(c->response));
    } else {
      c->self->Complete(id, UCX_STATUS(status, "receive response payload"));
    }
    delete c;
    ucp_request_free(request);
  };
  ucs_status_ptr_t req = ucp_am_recv_data_nbx(
      worker_, data, ctx->response.payload.data(), length, &rparam);
  if (req == nullptr) {
    Complete(h.request_id, std::move(ctx->response));
    delete ctx;
  } else if (UCS_PTR_IS_ERR(req)) {
    Complete(h.request_id,
             UCX_STATUS(UCS_PTR_STATUS(req), "receive response payload"));
    delete ctx;
  }
  return UCS_INPROGRESS;
}

}  // namespace

StatusOr<std::unique_ptr<DataPlane>> NewUcxDataPlane(
    const DataPlaneOptions& options) {
  // transport.ucx first, so that its values win over the defaults below.
  // setenv is not safe against a getenv running in another thread at the
  // same time; workers and trainers get here while starting, when none of
  // their threads reads the environment (UCX reads it in Start()).
  for (const auto& [name, value] : options.ucx_env) {
    const char* current = std::getenv(name.c_str());
    if (current == nullptr) {
      ::setenv(name.c_str(), value.c_str(), /*overwrite=*/0);
      LOG(INFO) << "data plane: " << name << "=" << value << " (transport.ucx)";
    } else if (value != current) {
      LOG(WARNING) << "data plane: the environment's " << name << "=" << current
                   << " overrides transport.ucx (" << value << ")";
    }
  }
  // Endpoints use peer error handling, and UCX 1.13 then leaves out every
  // transport that cannot report a lost peer itself or invalidate remote
  // memory access: shared memory (posix/sysv) and CMA, so processes of one
  // host talked over TCP at a third of the bandwidth. Allow both: a lost
  // peer is still found by the connection manager's socket and UCX
  // keepalive, and every request here has its own deadline. Set in the
  // environment (UCX reads CMA's setting only from there), once, before
  // the first UCX call, never over a value the user set.
  static std::once_flag shm_settings;
  std::call_once(shm_settings, [] {
    ::setenv("UCX_MM_ERROR_HANDLING", "y", /*overwrite=*/0);
    ::setenv("UCX_CMA_MEMORY_INVALIDATE", "y", /*overwrite=*/0);
  });
  return std::unique_ptr<DataPlane>(new UcxDataPlane(options));
}

}  // namespace switchyard::transport
