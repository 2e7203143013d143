// What only the UCX data plane does, in one process: a waiting sender
// drives the network, a send before Start fails at once, malformed headers
// from a raw UCX peer are refused with their reason, and a server holds no
// more than its byte budget.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <ucp/api/ucp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/logging.h"
#include "common/mutex.h"
#include "tests/transport/data_plane_test_util.h"
#include "transport/data_plane.h"

namespace switchyard::transport::data_plane_testing {
namespace {

// What only the UCX plane does.
class UcxDataPlaneTest : public DataPlanePairTest {
 protected:
  Backend backend() const override { return Backend::kUcx; }
};

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

TEST_F(UcxDataPlaneTest, SendBeforeStartFailsAtOnce) {
  // Nothing would ever run the request: it fails, it does not hang.
  auto idle = NewUcxDataPlane(DataPlaneOptions()).value();
  const auto start = Clock::now();
  auto r = idle->SendSync(server_->address(), EchoRequest(1, 16, 1), Ms(60000));
  EXPECT_EQ(r.status().code(), StatusCode::kCancelled) << r.status().ToString();
  EXPECT_LT(Clock::now() - start, Ms(1000));
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

}  // namespace
}  // namespace switchyard::transport::data_plane_testing
