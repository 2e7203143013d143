// The data plane: the DataPlane contract over every built backend (UCX and
// the in-process plane: payloads from 4 KiB to 256 MiB, concurrency,
// deadlines, errors, shutdown), then UCX's own behaviour in one process and
// across processes: waiters driving the network, malformed headers from a
// raw UCX peer, backpressure, lanes, and a server SIGKILLed mid-request.
//
// The binary doubles as the remote server: `data_plane_test --serve FILE`
// runs an echo server and writes its address to FILE.
#include "transport/data_plane.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/wait.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <optional>
#include <thread>

#include "common/buffer_pool.h"
#include "common/config.h"
#include "common/logging.h"
#include "common/mutex.h"
#include "transport/local/in_process_data_plane.h"

namespace switchyard::transport {
namespace {

using Ms = std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

std::string g_self_binary;

// Echo handler: kEcho returns the payload; step 999 is never answered
// (a silent server); step -1 answers with NOT_FOUND.
RequestHandler EchoHandler(std::vector<Reply>* held, std::mutex* mu) {
  return [held, mu](Message request, Reply reply) {
    if (request.header.step == 999) {
      std::lock_guard<std::mutex> lock(*mu);
      held->push_back(std::move(reply));
      return;
    }
    if (request.header.step == -1) {
      reply(ErrorResponse(request.header,
                          NotFoundError("unknown shard L9.E9.S9")));
      return;
    }
    reply(TensorResponse(request.header, std::move(request.payload)));
  };
}

Message EchoRequest(int64_t rows, int64_t cols, uint32_t seed,
                    int64_t step = 0) {
  Message m;
  m.header.kind = static_cast<uint8_t>(MessageKind::kEcho);
  m.header.step = step;
  m.payload = Tensor::Zeros(DType::kF32, {rows, cols}).value();
  uint32_t* words = static_cast<uint32_t*>(m.payload.data());
  for (int64_t i = 0; i < rows * cols; ++i) {
    words[i] = seed * 2654435761u + static_cast<uint32_t>(i);
  }
  m.header.dtype = static_cast<uint8_t>(DType::kF32);
  m.header.rows = rows;
  m.header.cols = cols;
  m.header.payload_bytes = m.payload.num_bytes();
  return m;
}

bool SamePayload(const Message& a, const Message& b) {
  return a.payload.num_bytes() == b.payload.num_bytes() &&
         std::memcmp(a.payload.data(), b.payload.data(),
                     a.payload.num_bytes()) == 0;
}

// Every data-plane backend built.
enum class Backend { kUcx, kInProcess };

std::string BackendName(const ::testing::TestParamInfo<Backend>& info) {
  return info.param == Backend::kUcx ? "Ucx" : "InProcess";
}

std::unique_ptr<DataPlane> NewDataPlane(Backend backend,
                                        const DataPlaneOptions& options) {
  if (backend == Backend::kInProcess) return NewInProcessDataPlane();
  return NewUcxDataPlane(options).value();
}

// A server (an echo handler, see EchoHandler) and a client of backend().
class DataPlanePairTest : public ::testing::Test {
 protected:
  virtual Backend backend() const = 0;
  void SetUp() override {
    server_ = NewDataPlane(backend(), ServerOptions());
    ASSERT_TRUE(server_->Start(EchoHandler(&held_, &held_mu_)).ok());
    client_ = NewDataPlane(backend(), DataPlaneOptions());
    ASSERT_TRUE(client_->Start(nullptr).ok());
  }
  void TearDown() override {
    client_->Shutdown();
    server_->Shutdown();
  }
  virtual DataPlaneOptions ServerOptions() { return DataPlaneOptions(); }

  // `threads` threads each send `per_thread` echoes with SendSync, request
  // `i` of thread `t` being make(t, i); how many came back intact.
  int EchoFromThreads(int threads, int per_thread,
                      const std::function<Message(int, int)>& make) {
    std::atomic<int> ok{0};
    std::vector<std::thread> running;
    for (int t = 0; t < threads; ++t) {
      running.emplace_back([&, t] {
        for (int i = 0; i < per_thread; ++i) {
          Message request = make(t, i);
          Message copy;
          copy.payload = request.payload.Clone();
          auto r = client_->SendSync(server_->address(), std::move(request),
                                     Ms(30000));
          if (r.ok() && SamePayload(*r, copy)) ++ok;
        }
      });
    }
    for (auto& t : running) t.join();
    return ok.load();
  }

  std::unique_ptr<DataPlane> server_, client_;
  std::vector<Reply> held_;
  std::mutex held_mu_;
};

// The DataPlane contract, over every backend.
class DataPlaneTest : public DataPlanePairTest,
                      public ::testing::WithParamInterface<Backend> {
 protected:
  Backend backend() const override { return GetParam(); }
};

INSTANTIATE_TEST_SUITE_P(Backends, DataPlaneTest,
                         ::testing::Values(Backend::kUcx, Backend::kInProcess),
                         BackendName);

// What only the UCX plane does.
class UcxDataPlaneTest : public DataPlanePairTest {
 protected:
  Backend backend() const override { return Backend::kUcx; }
};

TEST_P(DataPlaneTest, EchoesSmallAndLargePayloads) {
  // 4 KiB (eager) up to 256 MiB (rendezvous, straight into the tensor).
  for (int64_t bytes : {int64_t{4} << 10, int64_t{64} << 10, int64_t{1} << 20,
                        int64_t{64} << 20, int64_t{256} << 20}) {
    const int64_t cols = 1024;
    Message request = EchoRequest(bytes / 4 / cols, cols, 7);
    Message copy;
    copy.payload = request.payload.Clone();
    auto r =
        client_->SendSync(server_->address(), std::move(request), Ms(60000));
    ASSERT_TRUE(r.ok()) << bytes << ": " << r.status().ToString();
    EXPECT_EQ(r->header.payload_bytes, static_cast<uint64_t>(bytes));
    EXPECT_TRUE(SamePayload(*r, copy)) << bytes;
  }
}

TEST_P(DataPlaneTest, SendAllConvertsBf16AnswersIntoPoolBuffers) {
  // Small integers: exact in bf16, so the round trip must give them back.
  Tensor values = Tensor::Zeros(DType::kF32, {64, 256}).value();
  for (int64_t i = 0; i < values.num_elements(); ++i) {
    values.f32()[i] = static_cast<float>(i % 251) - 125.0f;
  }
  WireHeader header;
  header.kind = static_cast<uint8_t>(MessageKind::kEcho);
  const std::shared_ptr<BufferPool> pool = BufferPool::Create(size_t{1} << 30);
  for (BufferPool* with : {pool.get(), static_cast<BufferPool*>(nullptr)}) {
    std::vector<Outgoing> requests;
    for (int i = 0; i < 3; ++i) {
      requests.push_back({server_->address(),
                          TensorMessage(header, values.To(DType::kBF16)),
                          "echo " + std::to_string(i)});
    }
    auto replies = SendAll(client_.get(), std::move(requests), Ms(30000), with);
    ASSERT_TRUE(replies.ok()) << replies.status().ToString();
    ASSERT_EQ(replies->size(), 3u);
    for (const Tensor& r : *replies) {
      ASSERT_EQ(r.dtype(), DType::kF32);
      ASSERT_EQ(r.num_bytes(), values.num_bytes());
      EXPECT_EQ(std::memcmp(r.data(), values.data(), values.num_bytes()), 0);
    }
    // The first round's three replies are pool buffers, all in use.
    if (with != nullptr) {
      EXPECT_EQ(pool->cached_bytes(), 0u);
    }
  }
  // The first three came from the pool and went back to it.
  EXPECT_GE(pool->cached_bytes(), 3 * values.num_bytes());
}

TEST_P(DataPlaneTest, ManyConcurrentRequests) {
  // Alternate eager and rendezvous sizes.
  EXPECT_EQ(EchoFromThreads(4, 50,
                            [](int t, int i) {
                              return EchoRequest(i % 2 ? 4 : 64, 1024,
                                                 t * 1000 + i);
                            }),
            4 * 50);
}

TEST_F(UcxDataPlaneTest, AWaitingSenderDrivesItsOwnAnswers) {
  // SendAndWait lets the waiting thread drive UCX: the answer's callback
  // runs on it, with no hand-off from the progress thread.
  for (int64_t rows : {1, 64}) {  // Eager, then rendezvous.
    Mutex mu;
    CondVar cv;
    bool answered = false;
    std::thread::id ran_on;
    std::vector<SendRequest> send;
    send.push_back(SendRequest{server_->address(), EchoRequest(rows, 1024, 5),
                               Ms(10000), [&](StatusOr<Message> r) {
                                 EXPECT_TRUE(r.ok()) << r.status().ToString();
                                 MutexLock lock(&mu);
                                 ran_on = std::this_thread::get_id();
                                 answered = true;
                                 cv.NotifyOne();
                               }});
    MutexLock lock(&mu);
    ASSERT_TRUE(client_->SendAndWait(std::move(send), &mu, &cv,
                                     Clock::now() + Ms(10000),
                                     [&] { return answered; }));
    EXPECT_EQ(ran_on, std::this_thread::get_id()) << rows;
  }
}

TEST_P(DataPlaneTest, ManyWaitersAtOnceAllGetTheirOwnAnswers) {
  // One waiter drives at a time; the others see their answers arrive
  // through it, or take over when it leaves.
  EXPECT_EQ(EchoFromThreads(8, 200,
                            [](int t, int i) {
                              return EchoRequest(1, 64 + t, t * 1000 + i);
                            }),
            8 * 200);
}

TEST_P(DataPlaneTest, CallbackSendsAfterAWaiterLeftAreAnsweredPromptly) {
  // A plain Send after a while idle is answered at once. UCX: after a
  // waiter leaves with nothing in flight the progress thread stays parked;
  // a plain Send must unpark it, not wait for its next look (up to 64 ms
  // once idle).
  std::vector<double> ms;
  for (int i = 0; i < 12; ++i) {
    ASSERT_TRUE(
        client_->SendSync(server_->address(), EchoRequest(1, 16, i), Ms(5000))
            .ok());
    std::this_thread::sleep_for(Ms(150));  // Its looks grow to 64 ms apart.
    std::mutex mu;
    std::condition_variable cv;
    bool answered = false;
    const auto start = Clock::now();
    client_->Send(server_->address(), EchoRequest(1, 16, 100 + i), Ms(5000),
                  [&](StatusOr<Message> r) {
                    EXPECT_TRUE(r.ok()) << r.status().ToString();
                    std::lock_guard<std::mutex> lock(mu);
                    answered = true;
                    cv.notify_one();
                  });
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, Ms(5000), [&] { return answered; }));
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start)
                     .count());
  }
  std::sort(ms.begin(), ms.end());
  // Typically well under 1 ms; a missed wake-up costs tens of ms.
  EXPECT_LT(ms[ms.size() / 2], 10.0);
}

TEST_P(DataPlaneTest, ShutdownReleasesAWaiter) {
  std::thread shut([&] {
    std::this_thread::sleep_for(Ms(200));
    client_->Shutdown();
  });
  const auto start = Clock::now();
  auto r = client_->SendSync(server_->address(), EchoRequest(1, 16, 1, 999),
                             Ms(30000));
  shut.join();
  EXPECT_EQ(r.status().code(), StatusCode::kCancelled) << r.status().ToString();
  EXPECT_LT(Clock::now() - start, Ms(5000));
}

TEST_P(DataPlaneTest, SilentServerGivesDeadlineThenKeepsServing) {
  const auto start = Clock::now();
  auto r = client_->SendSync(server_->address(), EchoRequest(1, 16, 1, 999),
                             Ms(300));
  EXPECT_EQ(r.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_LT(Clock::now() - start, Ms(2000));
  auto ok =
      client_->SendSync(server_->address(), EchoRequest(1, 16, 2), Ms(5000));
  EXPECT_TRUE(ok.ok()) << ok.status().ToString();
}

TEST_P(DataPlaneTest, DeadlinesExpireInOrderAmongManyAnsweredRequests) {
  // Answered requests leave their deadlines behind (dropped lazily, the
  // lot rebuilt when mostly stale): a silent request with a long deadline
  // stays pending through hundreds of answered ones, and three short ones
  // still expire at their own deadlines, shortest first.
  struct Expired {
    std::mutex mu;
    std::vector<std::pair<int, StatusCode>> tags;
    std::vector<Clock::duration> after;
  };
  // Shared: the 60 s request's callback runs at TearDown's shutdown.
  auto expired = std::make_shared<Expired>();
  const auto start = Clock::now();
  auto expect_expiry = [&](int tag, Ms timeout) {
    client_->Send(server_->address(), EchoRequest(1, 16, tag, 999), timeout,
                  [expired, start, tag](StatusOr<Message> r) {
                    std::lock_guard<std::mutex> lock(expired->mu);
                    expired->tags.emplace_back(tag, r.status().code());
                    expired->after.push_back(Clock::now() - start);
                  });
  };
  expect_expiry(0, Ms(60000));
  for (int i = 0; i < 300; ++i) {
    ASSERT_TRUE(
        client_->SendSync(server_->address(), EchoRequest(1, 16, i), Ms(60000))
            .ok());
  }
  const auto sent = Clock::now();
  expect_expiry(3, Ms(900));
  expect_expiry(1, Ms(300));
  expect_expiry(2, Ms(600));
  for (int i = 0; i < 300; ++i) {
    ASSERT_TRUE(
        client_->SendSync(server_->address(), EchoRequest(1, 16, i), Ms(60000))
            .ok());
  }
  const auto waited = Clock::now() + Ms(10000);
  while (Clock::now() < waited) {
    {
      std::lock_guard<std::mutex> lock(expired->mu);
      if (expired->tags.size() >= 3) break;
    }
    std::this_thread::sleep_for(Ms(10));
  }
  std::lock_guard<std::mutex> lock(expired->mu);
  ASSERT_EQ(expired->tags.size(), 3u);  // Not the 60 s one.
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(expired->tags[i].first, i + 1);
    EXPECT_EQ(expired->tags[i].second, StatusCode::kDeadlineExceeded);
    EXPECT_GE(expired->after[i], sent - start + Ms(300 * (i + 1)));
    EXPECT_LT(expired->after[i], sent - start + Ms(300 * (i + 1) + 1500));
  }
}

TEST_P(DataPlaneTest, ALateAnswerDoesNotCompleteALaterRequest) {
  // Request ids are never reused: the answer to an expired request, sent
  // after a new request took its place, is dropped, and the new request
  // gets its own answer.
  auto expired = client_->SendSync(server_->address(),
                                   EchoRequest(1, 16, 1, 999), Ms(200));
  ASSERT_EQ(expired.status().code(), StatusCode::kDeadlineExceeded);
  struct Answer {
    std::mutex mu;
    std::condition_variable cv;
    std::optional<StatusOr<Message>> result;
  };
  // Shared: on a failed assertion the callback runs at TearDown.
  auto answer = std::make_shared<Answer>();
  client_->Send(server_->address(), EchoRequest(1, 16, 2, 999), Ms(10000),
                [answer](StatusOr<Message> r) {
                  std::lock_guard<std::mutex> lock(answer->mu);
                  answer->result = std::move(r);
                  answer->cv.notify_one();
                });
  const auto held = Clock::now() + Ms(5000);
  while (Clock::now() < held) {
    {
      std::lock_guard<std::mutex> lock(held_mu_);
      if (held_.size() == 2) break;
    }
    std::this_thread::sleep_for(Ms(5));
  }
  std::vector<Reply> replies;
  {
    std::lock_guard<std::mutex> lock(held_mu_);
    replies = std::move(held_);
  }
  ASSERT_EQ(replies.size(), 2u);
  const Message late = EchoRequest(1, 16, 71);
  const Message own = EchoRequest(1, 16, 72);
  replies[0](TensorResponse(late.header, late.payload.Clone()));
  std::this_thread::sleep_for(Ms(100));
  {
    std::lock_guard<std::mutex> lock(answer->mu);
    EXPECT_FALSE(answer->result.has_value()) << "completed by the late answer";
  }
  replies[1](TensorResponse(own.header, own.payload.Clone()));
  std::unique_lock<std::mutex> lock(answer->mu);
  ASSERT_TRUE(answer->cv.wait_for(lock, Ms(5000),
                                  [&] { return answer->result.has_value(); }));
  ASSERT_TRUE(answer->result->ok()) << answer->result->status().ToString();
  EXPECT_TRUE(SamePayload(**answer->result, own));
}

TEST_P(DataPlaneTest, HandlerErrorsReachTheCaller) {
  auto r = client_->SendSync(server_->address(), EchoRequest(1, 16, 1, -1),
                             Ms(5000));
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(r.status().message(), "unknown shard L9.E9.S9");
}

TEST_P(DataPlaneTest, SendAfterShutdownIsCancelledNotLost) {
  const std::string address = server_->address();
  client_->Shutdown();
  const auto start = Clock::now();
  auto r = client_->SendSync(address, EchoRequest(1, 16, 1), Ms(60000));
  EXPECT_EQ(r.status().code(), StatusCode::kCancelled);
  EXPECT_LT(Clock::now() - start, Ms(1000));
}

TEST_F(UcxDataPlaneTest, SendBeforeStartFailsAtOnce) {
  // Nothing would ever run the request: it fails, it does not hang.
  auto idle = NewUcxDataPlane(DataPlaneOptions()).value();
  const auto start = Clock::now();
  auto r = idle->SendSync(server_->address(), EchoRequest(1, 16, 1), Ms(60000));
  EXPECT_EQ(r.status().code(), StatusCode::kCancelled) << r.status().ToString();
  EXPECT_LT(Clock::now() - start, Ms(1000));
}

TEST_P(DataPlaneTest, UnreachablePeerFailsInTime) {
  const auto start = Clock::now();
  // Nothing listens on port 1.
  auto r = client_->SendSync("127.0.0.1:1", EchoRequest(1, 16, 1), Ms(2000));
  EXPECT_FALSE(r.ok());
  EXPECT_LT(Clock::now() - start, Ms(4000));
}

// A raw UCX client that sends arbitrary header bytes.
class RawUcxPeer {
 public:
  explicit RawUcxPeer(const std::string& server) {
    ucp_config_t* config;
    CHECK_EQ(ucp_config_read(nullptr, nullptr, &config), UCS_OK);
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_AM;
    CHECK_EQ(ucp_init(&params, config, &context_), UCS_OK);
    ucp_config_release(config);
    ucp_worker_params_t wp{};
    CHECK_EQ(ucp_worker_create(context_, &wp, &worker_), UCS_OK);
    ucp_am_handler_param_t am{};
    am.field_mask =
        UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
        UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    am.id = 2;
    am.flags = UCP_AM_FLAG_WHOLE_MSG;
    am.arg = this;
    am.cb = [](void* arg, const void* h, size_t hl, void* d, size_t l,
               const ucp_am_recv_param_t*) {
      auto* self = static_cast<RawUcxPeer*>(arg);
      if (hl == sizeof(WireHeader)) std::memcpy(&self->last_, h, hl);
      self->last_text_.assign(static_cast<const char*>(d), l);
      self->responses_++;
      return UCS_OK;
    };
    CHECK_EQ(ucp_worker_set_am_recv_handler(worker_, &am), UCS_OK);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(std::stoi(server.substr(server.rfind(':') + 1)));
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                    UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // Servers require it.
    ep.sockaddr.addr = reinterpret_cast<sockaddr*>(&addr);
    ep.sockaddr.addrlen = sizeof(addr);
    CHECK_EQ(ucp_ep_create(worker_, &ep, &ep_), UCS_OK);
  }
  ~RawUcxPeer() {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* req = ucp_ep_close_nbx(ep_, &p);
    if (UCS_PTR_IS_PTR(req)) ucp_request_free(req);
    ucp_worker_destroy(worker_);
    ucp_cleanup(context_);
  }
  // Sends and waits up to `wait` for a response; returns whether one came.
  bool SendAndWait(const void* header, size_t header_bytes,
                   const std::string& payload, Ms wait) {
    const int before = responses_;
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_AM_SEND_FLAG_REPLY;
    void* req = ucp_am_send_nbx(ep_, 1, header, header_bytes, payload.data(),
                                payload.size(), &p);
    const auto deadline = Clock::now() + wait;
    while (Clock::now() < deadline) {
      ucp_worker_progress(worker_);
      if (UCS_PTR_IS_PTR(req) &&
          ucp_request_check_status(req) != UCS_INPROGRESS) {
        ucp_request_free(req);
        req = nullptr;
      }
      if (responses_ > before && req == nullptr) return true;
    }
    if (UCS_PTR_IS_PTR(req)) ucp_request_free(req);
    return responses_ > before;
  }
  const WireHeader& last() const { return last_; }
  const std::string& last_text() const { return last_text_; }

 private:
  ucp_context_h context_;
  ucp_worker_h worker_;
  ucp_ep_h ep_;
  WireHeader last_{};
  std::string last_text_;
  int responses_ = 0;
};

TEST_F(UcxDataPlaneTest, MalformedHeadersGetErrorsAndServerKeepsServing) {
  RawUcxPeer raw(server_->address());
  struct Case {
    const char* what;
    std::function<void(WireHeader*)> corrupt;
    std::string payload;
    StatusCode code;
    const char* fragment;
  };
  const std::string bytes64(64, 'x');
  const std::vector<Case> cases = {
      {"bad magic", [](WireHeader* h) { h->magic = 0xdeadbeef; }, "",
       StatusCode::kInvalidArgument, "bad header magic"},
      {"newer version", [](WireHeader* h) { h->version = 9; }, "",
       StatusCode::kFailedPrecondition, "wire version 9"},
      {"unknown kind", [](WireHeader* h) { h->kind = 77; }, "",
       StatusCode::kInvalidArgument, "unknown message kind 77"},
      {"size vs shape",
       [](WireHeader* h) {
         h->dtype = 1;
         h->rows = 4;
         h->cols = 4;  // 64 bytes needed, header says 64 but 16 arrive.
         h->payload_bytes = 64;
       },
       std::string(16, 'x'), StatusCode::kInvalidArgument,
       "header announces 64 payload bytes but 16 arrived"},
      {"shape vs dtype",
       [](WireHeader* h) {
         h->dtype = 2;  // bf16: 4 x 4 is 32 bytes, not 64.
         h->rows = 4;
         h->cols = 4;
         h->payload_bytes = 64;
       },
       bytes64, StatusCode::kInvalidArgument, "needs 32 bytes"},
      {"unknown dtype",
       [](WireHeader* h) {
         h->dtype = 42;
         h->rows = 1;
         h->cols = 64;
         h->payload_bytes = 64;
       },
       bytes64, StatusCode::kInvalidArgument, "unknown dtype 42"},
  };
  for (const Case& c : cases) {
    WireHeader h;
    h.kind = static_cast<uint8_t>(MessageKind::kEcho);
    h.request_id = 77;
    c.corrupt(&h);
    ASSERT_TRUE(raw.SendAndWait(&h, sizeof(h), c.payload, Ms(5000))) << c.what;
    EXPECT_EQ(raw.last().request_id, 77u) << c.what;
    EXPECT_EQ(raw.last().status_code, static_cast<int32_t>(c.code)) << c.what;
    EXPECT_NE(raw.last_text().find(c.fragment), std::string::npos)
        << c.what << ": " << raw.last_text();
  }
  // A truncated header cannot be answered (its request id is unknown): it
  // is dropped and logged.
  WireHeader h;
  EXPECT_FALSE(raw.SendAndWait(&h, 40, "", Ms(300)));
  // The server still serves everyone.
  auto r =
      client_->SendSync(server_->address(), EchoRequest(2, 8, 3), Ms(5000));
  EXPECT_TRUE(r.ok()) << r.status().ToString();
}

class BackpressureTest : public UcxDataPlaneTest {
 protected:
  DataPlaneOptions ServerOptions() override {
    DataPlaneOptions o;
    o.max_inflight_bytes = 1 << 20;  // Two 512 KiB requests at a time.
    return o;
  }
};

TEST_F(BackpressureTest, ServerHoldsAtMostItsBudget) {
  constexpr int kRequests = 8;
  std::atomic<int> done{0};
  for (int i = 0; i < kRequests; ++i) {
    // step 999: the handler holds the reply.
    client_->Send(server_->address(), EchoRequest(128, 1024, i, 999), Ms(30000),
                  [&](StatusOr<Message> r) {
                    EXPECT_TRUE(r.ok()) << r.status().ToString();
                    ++done;
                  });
  }
  std::this_thread::sleep_for(Ms(500));
  size_t max_held = 0;
  // Answer held requests one at a time; more arrive only as bytes drain.
  for (int answered = 0; answered < kRequests;) {
    std::vector<Reply> batch;
    {
      std::lock_guard<std::mutex> lock(held_mu_);
      max_held = std::max(max_held, held_.size());
      batch.swap(held_);
    }
    for (auto& reply : batch) {
      Message m;
      m.header.kind = static_cast<uint8_t>(MessageKind::kEcho);
      reply(TensorResponse(m.header, Tensor()));
      ++answered;
    }
    std::this_thread::sleep_for(Ms(50));
  }
  const auto deadline = Clock::now() + Ms(10000);
  while (done.load() < kRequests && Clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(10));
  }
  EXPECT_EQ(done.load(), kRequests);
  EXPECT_LE(max_held, 2u) << "the server took more than its byte budget";
  EXPECT_GE(max_held, 1u);
}

// ---- Across processes ----

class RemoteServer {
 public:
  RemoteServer() {
    file_ = ::testing::TempDir() + "/dp_server_" + std::to_string(::getpid());
    std::remove(file_.c_str());
    pid_ = ::fork();
    if (pid_ == 0) {
      ::execl(g_self_binary.c_str(), g_self_binary.c_str(), "--serve",
              file_.c_str(), nullptr);
      ::_exit(127);
    }
    const auto deadline = Clock::now() + Ms(20000);
    while (Clock::now() < deadline) {
      std::ifstream in(file_);
      if (in >> address_) break;
      std::this_thread::sleep_for(Ms(20));
    }
  }
  ~RemoteServer() {
    Kill();
    std::remove(file_.c_str());
  }
  void Kill() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }
  const std::string& address() const { return address_; }

 private:
  pid_t pid_ = -1;
  std::string file_, address_;
};

TEST(DataPlaneAcrossProcessesTest, EchoAndPeerKilledMidRequest) {
  RemoteServer server;
  ASSERT_FALSE(server.address().empty()) << "remote server did not start";
  auto client = NewUcxDataPlane(DataPlaneOptions()).value();
  ASSERT_TRUE(client->Start(nullptr).ok());
  for (int64_t rows : {1, 4096}) {  // 4 KiB and 16 MiB.
    Message request = EchoRequest(rows, 1024, 5);
    Message copy;
    copy.payload = request.payload.Clone();
    auto r = client->SendSync(server.address(), std::move(request), Ms(30000));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_TRUE(SamePayload(*r, copy));
  }
  // A request the server will never answer; then the server dies.
  std::atomic<bool> finished{false};
  Status result;
  const auto start = Clock::now();
  Clock::time_point finished_at;
  constexpr Ms kDeadline(5000);
  client->Send(server.address(), EchoRequest(1, 16, 1, 999), kDeadline,
               [&](StatusOr<Message> r) {
                 result = r.status();
                 finished_at = Clock::now();
                 finished = true;
               });
  std::this_thread::sleep_for(Ms(200));
  server.Kill();
  while (!finished.load() && Clock::now() < start + kDeadline + Ms(3000)) {
    std::this_thread::sleep_for(Ms(10));
  }
  ASSERT_TRUE(finished.load()) << "no completion after the deadline: a hang";
  EXPECT_FALSE(result.ok());
  EXPECT_LE(finished_at - start, kDeadline + Ms(500));
  std::cout << "peer killed mid-request: " << result.ToString() << " after "
            << std::chrono::duration_cast<Ms>(finished_at - start).count()
            << " ms\n";
  client->Shutdown();
}

TEST(DataPlaneAcrossProcessesTest, ConcurrentLargeEchoesComeBackIntact) {
  // 16 MiB rendezvous payloads, 4 in flight, each with its own contents:
  // receive buffers are reused from pools on both sides, so a buffer handed
  // out while the transport still reads or writes it shows up here.
  RemoteServer server;
  ASSERT_FALSE(server.address().empty()) << "remote server did not start";
  auto client = NewUcxDataPlane(DataPlaneOptions()).value();
  ASSERT_TRUE(client->Start(nullptr).ok());
  constexpr int kRequests = 48, kWindow = 4;
  std::mutex mu;
  std::condition_variable cv;
  int in_flight = 0, done = 0;
  std::vector<std::string> failures;
  for (int i = 0; i < kRequests; ++i) {
    {
      std::unique_lock<std::mutex> lock(mu);
      ASSERT_TRUE(
          cv.wait_for(lock, Ms(30000), [&] { return in_flight < kWindow; }));
      ++in_flight;
    }
    Message request = EchoRequest(4096, 1024, 100 + i);
    auto expected = std::make_shared<Tensor>(request.payload.Clone());
    client->Send(
        server.address(), std::move(request), Ms(30000),
        [&, i, expected](StatusOr<Message> r) {
          std::string failure;
          if (!r.ok()) {
            failure = r.status().ToString();
          } else if (r->payload.num_bytes() != expected->num_bytes() ||
                     std::memcmp(r->payload.data(), expected->data(),
                                 expected->num_bytes()) != 0) {
            failure = "payload differs";
          }
          std::lock_guard<std::mutex> lock(mu);
          if (!failure.empty()) {
            failures.push_back("echo " + std::to_string(i) + ": " + failure);
          }
          --in_flight;
          ++done;
          cv.notify_all();
        });
  }
  std::unique_lock<std::mutex> lock(mu);
  ASSERT_TRUE(cv.wait_for(lock, Ms(60000), [&] { return done == kRequests; }));
  EXPECT_TRUE(failures.empty())
      << failures.size() << " bad echoes, first " << failures.front();
  lock.unlock();
  // Processes of one host talk over shared memory (active messages) and
  // CMA (rendezvous), not TCP, unless UCX_TLS says otherwise.
  const std::string lanes = client->ConnectionInfo(server.address());
  std::cout << "lanes: " << lanes << "\n";
  if (std::getenv("UCX_TLS") == nullptr) {
    EXPECT_TRUE(lanes.find("am=sysv/memory") != std::string::npos ||
                lanes.find("am=posix/memory") != std::string::npos)
        << lanes;
    EXPECT_NE(lanes.find("rma_bw=cma/memory"), std::string::npos) << lanes;
    EXPECT_EQ(lanes.find("tcp"), std::string::npos) << lanes;
  }
  EXPECT_EQ(client->ConnectionInfo("127.0.0.1:1"), "");
  client->Shutdown();
}

// --lanes NAME=VALUE FILE: a server and a client in this process, both
// with ucx_env {NAME: VALUE} (as transport.ucx gives it), one 16 MiB echo,
// then the client's ConnectionInfo into FILE.
int ReportLanes(const std::string& setting, const char* out_file) {
  const size_t eq = setting.find('=');
  DataPlaneOptions options;
  options.ucx_env[setting.substr(0, eq)] = setting.substr(eq + 1);
  std::vector<Reply> held;
  std::mutex mu;
  auto server = NewUcxDataPlane(options).value();
  auto client = NewUcxDataPlane(options).value();
  Status s = server->Start(EchoHandler(&held, &mu));
  if (s.ok()) s = client->Start(nullptr);
  if (s.ok()) {
    s = client
            ->SendSync(server->address(), EchoRequest(4096, 1024, 3), Ms(30000))
            .status();
  }
  std::ofstream out(out_file);
  out << (s.ok() ? client->ConnectionInfo(server->address()) : s.ToString());
  client->Shutdown();
  server->Shutdown();
  return s.ok() ? 0 : 1;
}

// The lanes a child process reports (ReportLanes) for `setting`, with
// `environment` ("" or NAME=VALUE) added to this process's environment
// less UCX_TLS and UCX_CMA_MEMORY_INVALIDATE.
std::string LanesInAChild(const std::string& setting,
                          const std::string& environment) {
  const std::string file =
      ::testing::TempDir() + "/dp_lanes_" + std::to_string(::getpid()) + "_" +
      std::to_string(std::hash<std::string>()(setting + environment));
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string var = *e;
    if (var.rfind("UCX_TLS=", 0) == 0 ||
        var.rfind("UCX_CMA_MEMORY_INVALIDATE=", 0) == 0) {
      continue;
    }
    env.push_back(var);
  }
  if (!environment.empty()) env.push_back(environment);
  std::vector<char*> envp;
  for (std::string& var : env) envp.push_back(var.data());
  envp.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execle(g_self_binary.c_str(), g_self_binary.c_str(), "--lanes",
             setting.c_str(), file.c_str(), nullptr, envp.data());
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  std::ifstream in(file);
  std::string lanes((std::istreambuf_iterator<char>(in)),
                    std::istreambuf_iterator<char>());
  std::remove(file.c_str());
  return "exit " + std::to_string(WEXITSTATUS(status)) + ": " + lanes;
}

TEST(DataPlaneOptionsTest, TransportUcxSettingsBecomeUcxEnv) {
  auto loaded = ParseConfig(
      "transport:\n  ucx_tls: tcp\n  ucx:\n    UCX_NET_DEVICES: lo\n", "t.yaml",
      {"transport.ucx.UCX_RNDV_THRESH=8k"});
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const DataPlaneOptions options =
      DataPlaneOptionsFrom(loaded->config.transport());
  EXPECT_EQ(options.ucx_tls, "tcp");
  const std::map<std::string, std::string> expected = {
      {"UCX_NET_DEVICES", "lo"}, {"UCX_RNDV_THRESH", "8k"}};
  EXPECT_EQ(options.ucx_env, expected);
}

// transport.ucx reaches UCX: UCX_CMA_MEMORY_INVALIDATE=n takes CMA out of
// the rendezvous lanes (peer error handling then rules it out), where the
// data plane's default (y) keeps it; the environment's value wins.
TEST(DataPlaneAcrossProcessesTest, TransportUcxSettingsReachUcx) {
  const std::string by_default =
      LanesInAChild("UCX_RNDV_THRESH=auto", /*environment=*/"");
  EXPECT_NE(by_default.find("exit 0: "), std::string::npos) << by_default;
  EXPECT_NE(by_default.find("rma_bw=cma/memory"), std::string::npos)
      << by_default;

  const std::string without_cma = LanesInAChild("UCX_CMA_MEMORY_INVALIDATE=n",
                                                /*environment=*/"");
  EXPECT_NE(without_cma.find("exit 0: "), std::string::npos) << without_cma;
  EXPECT_EQ(without_cma.find("cma"), std::string::npos) << without_cma;
  EXPECT_NE(without_cma.find("rma_bw="), std::string::npos) << without_cma;

  const std::string environment_wins = LanesInAChild(
      "UCX_CMA_MEMORY_INVALIDATE=n", "UCX_CMA_MEMORY_INVALIDATE=y");
  EXPECT_NE(environment_wins.find("rma_bw=cma/memory"), std::string::npos)
      << environment_wins;
  std::cout << "default: " << by_default
            << "\nUCX_CMA_MEMORY_INVALIDATE=n: " << without_cma << "\n";
}

int ServeForever(const char* address_file) {
  std::vector<Reply> held;
  std::mutex mu;
  auto server = NewUcxDataPlane(DataPlaneOptions()).value();
  Status s = server->Start(EchoHandler(&held, &mu));
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  {
    std::ofstream out(std::string(address_file) + ".tmp");
    out << server->address() << "\n";
  }
  std::rename((std::string(address_file) + ".tmp").c_str(), address_file);
  while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
}

}  // namespace
}  // namespace switchyard::transport

int main(int argc, char** argv) {
  switchyard::InitLogging(argv[0]);
  switchyard::transport::g_self_binary = argv[0];
  if (argc == 3 && std::strcmp(argv[1], "--serve") == 0) {
    return switchyard::transport::ServeForever(argv[2]);
  }
  if (argc == 4 && std::strcmp(argv[1], "--lanes") == 0) {
    return switchyard::transport::ReportLanes(argv[2], argv[3]);
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
