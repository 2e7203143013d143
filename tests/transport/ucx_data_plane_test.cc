// What only the UCX data plane does, in one process: a waiting sender
// drives the network, a response lands in the tensor its request named
// (Message::receive_into) when it fits, a send before Start fails at once,
// every connection authenticates (a raw UCX peer without the secret gets
// nothing and is dropped; planes with different secrets cannot talk; only the
// connection a request went out on may answer it), malformed headers from an
// authenticated raw UCX peer are refused with their reason, and a server
// holds no more than its byte budget.
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
#include "tests/testing/data_plane_options.h"
#include "tests/transport/data_plane_test_util.h"
#include "transport/control/auth.h"
#include "transport/data_plane.h"
#include "transport/ucx/am_codec.h"
#include "transport/ucx/peer_auth.h"

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

TEST_F(UcxDataPlaneTest, AResponseLandsInTheTensorTheSenderNamed) {
  // Eager and rendezvous answers alike go straight into receive_into when
  // they fit it; one that does not fit comes in a fresh buffer and leaves
  // the named tensor as it was.
  for (int64_t rows : {1, 64}) {
    Tensor into = Tensor::Zeros(DType::kF32, {rows * 1024}).value();
    Message fits = EchoRequest(rows, 1024, 7);
    fits.receive_into = into;
    auto r = client_->SendSync(server_->address(), std::move(fits), Ms(10000));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->payload.data(), into.data()) << rows;
    const Message sent = EchoRequest(rows, 1024, 7);
    EXPECT_EQ(std::memcmp(into.data(), sent.payload.data(), into.num_bytes()),
              0)
        << rows;

    Tensor small = Tensor::Zeros(DType::kF32, {rows * 1024 - 1}).value();
    Message too_big = EchoRequest(rows, 1024, 9);
    too_big.receive_into = small;
    r = client_->SendSync(server_->address(), std::move(too_big), Ms(10000));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_NE(r->payload.data(), small.data()) << rows;
    EXPECT_EQ(r->payload.num_elements(), rows * 1024);
    const auto* values = static_cast<const float*>(small.data());
    EXPECT_TRUE(std::all_of(values, values + small.num_elements(), [](float v) {
      return v == 0.0f;
    })) << rows;
  }
}

TEST_F(UcxDataPlaneTest, ConnectOpensTheConnectionAheadOfARequest) {
  EXPECT_EQ(client_->ConnectionInfo(server_->address()), "");
  client_->Connect(server_->address());
  const auto deadline = Clock::now() + Ms(10000);
  while (client_->ConnectionInfo(server_->address()).empty() &&
         Clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(5));
  }
  EXPECT_NE(client_->ConnectionInfo(server_->address()), "");
  client_->Connect(server_->address());  // Up already: nothing happens.
  auto r =
      client_->SendSync(server_->address(), EchoRequest(1, 16, 3), Ms(10000));
  EXPECT_TRUE(r.ok()) << r.status().ToString();
}

TEST_F(UcxDataPlaneTest, SendBeforeStartFailsAtOnce) {
  // Nothing would ever run the request: it fails, it does not hang.
  auto idle = NewUcxDataPlane(testing::TestDataPlaneOptions()).value();
  const auto start = Clock::now();
  auto r = idle->SendSync(server_->address(), EchoRequest(1, 16, 1), Ms(60000));
  EXPECT_EQ(r.status().code(), StatusCode::kCancelled) << r.status().ToString();
  EXPECT_LT(Clock::now() - start, Ms(1000));
}

// A raw UCX client that sends arbitrary header bytes, and runs the
// data-plane handshake only when told to (with the secret it is given).
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
    CHECK(
        SetAmHandler(worker_, kResponseAm, &RawUcxPeer::OnResponse, this).ok());
    CHECK(SetAmHandler(worker_, kAuthAm, &RawUcxPeer::OnAuth, this).ok());
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(std::stoi(server.substr(server.rfind(':') + 1)));
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                    UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // Servers require it.
    ep.err_handler.arg = this;
    ep.err_handler.cb = [](void* arg, ucp_ep_h, ucs_status_t) {
      static_cast<RawUcxPeer*>(arg)->closed_by_peer_ = true;
    };
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
  // Runs the client's side of the handshake with `secret`; true when the
  // server accepted it within 5 s.
  bool Authenticate(const std::string& secret) {
    const std::string nonce = control::RandomNonce();
    AuthMessage hello = MakeAuthMessage(AuthStep::kHello, nonce);
    if (!Send(kAuthAm, &hello, sizeof(hello), "", Ms(5000),
              [&] { return auth_.auth_step() == AuthStep::kChallenge; })) {
      return false;
    }
    AuthMessage proof =
        MakeAuthMessage(AuthStep::kProof, {},
                        DataClientProof(secret, auth_.nonce_bytes(), nonce));
    Send(kAuthAm, &proof, sizeof(proof), "", Ms(5000), [&] {
      return auth_.auth_step() == AuthStep::kAccepted ||
             auth_.auth_step() == AuthStep::kRefused || closed_by_peer_;
    });
    return auth_.auth_step() == AuthStep::kAccepted && !closed_by_peer_;
  }
  // Sends a request and waits up to `wait` for a response; returns whether
  // one came.
  bool SendAndWait(const void* header, size_t header_bytes,
                   const std::string& payload, Ms wait,
                   unsigned am_id = kRequestAm) {
    const int before = responses_;
    return Send(am_id, header, header_bytes, payload, wait,
                [&] { return responses_ > before; });
  }
  // Progresses for `wait`; true if the server closed the connection.
  bool ClosedByServer(Ms wait) {
    Send(kAuthAm, nullptr, 0, "", wait, [&] { return closed_by_peer_; });
    return closed_by_peer_;
  }
  const WireHeader& last() const { return last_; }
  const std::string& last_text() const { return last_text_; }

 private:
  static ucs_status_t OnResponse(void* arg, const void* h, size_t hl, void* d,
                                 size_t l, const ucp_am_recv_param_t*) {
    auto* self = static_cast<RawUcxPeer*>(arg);
    if (hl == sizeof(WireHeader)) std::memcpy(&self->last_, h, hl);
    self->last_text_.assign(static_cast<const char*>(d), l);
    self->responses_++;
    return UCS_OK;
  }
  static ucs_status_t OnAuth(void* arg, const void* h, size_t hl, void*, size_t,
                             const ucp_am_recv_param_t*) {
    auto* self = static_cast<RawUcxPeer*>(arg);
    if (hl == sizeof(AuthMessage)) std::memcpy(&self->auth_, h, hl);
    return UCS_OK;
  }
  // Sends (when `header` is given) AM `am_id`, then progresses until
  // `until()` holds and the send is done, or `wait` passes.
  bool Send(unsigned am_id, const void* header, size_t header_bytes,
            const std::string& payload, Ms wait,
            const std::function<bool()>& until) {
    void* req = nullptr;
    if (header != nullptr && !closed_by_peer_) {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_AM_SEND_FLAG_REPLY;
      req = ucp_am_send_nbx(ep_, am_id, header, header_bytes, payload.data(),
                            payload.size(), &p);
    }
    const auto deadline = Clock::now() + wait;
    bool done = false;
    while (Clock::now() < deadline) {
      ucp_worker_progress(worker_);
      if (UCS_PTR_IS_PTR(req) &&
          ucp_request_check_status(req) != UCS_INPROGRESS) {
        ucp_request_free(req);
        req = nullptr;
      }
      if (until() && !UCS_PTR_IS_PTR(req)) {
        done = true;
        break;
      }
    }
    if (UCS_PTR_IS_PTR(req)) ucp_request_free(req);
    return done || until();
  }

  ucp_context_h context_;
  ucp_worker_h worker_;
  ucp_ep_h ep_;
  WireHeader last_{};
  std::string last_text_;
  int responses_ = 0;
  AuthMessage auth_{};
  bool closed_by_peer_ = false;
};

TEST_F(UcxDataPlaneTest, MalformedHeadersGetErrorsAndServerKeepsServing) {
  RawUcxPeer raw(server_->address());
  ASSERT_TRUE(raw.Authenticate(testing::kTestClusterSecret));
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

// A peer that does not run the handshake gets no answer, no error text (no
// epoch, step or shard), and is dropped; the server serves everyone else.
TEST_F(UcxDataPlaneTest, UnauthenticatedPeersGetNothingAndAreDropped) {
  RawUcxPeer raw(server_->address());
  Message echo = EchoRequest(1, 16, 5);
  echo.header.request_id = 9;
  const std::string payload(reinterpret_cast<const char*>(echo.payload.data()),
                            echo.payload.num_bytes());
  EXPECT_FALSE(
      raw.SendAndWait(&echo.header, sizeof(echo.header), payload, Ms(1000)));
  EXPECT_TRUE(raw.ClosedByServer(Ms(5000)));
  auto r =
      client_->SendSync(server_->address(), EchoRequest(2, 8, 3), Ms(5000));
  EXPECT_TRUE(r.ok()) << r.status().ToString();
}

TEST_F(UcxDataPlaneTest, APeerWithTheWrongSecretIsRefused) {
  RawUcxPeer raw(server_->address());
  EXPECT_FALSE(raw.Authenticate("not-the-cluster-secret-at-all-0123"));
  EXPECT_TRUE(raw.ClosedByServer(Ms(5000)));
  RawUcxPeer good(server_->address());
  EXPECT_TRUE(good.Authenticate(testing::kTestClusterSecret));
}

// Both directions: whichever end sends, the server's proof does not check
// at the client, which fails its requests with UNAUTHENTICATED, naming the
// likely cause, not a hang.
TEST_F(UcxDataPlaneTest, PlanesWithDifferentSecretsCannotTalk) {
  DataPlaneOptions other = testing::TestDataPlaneOptions();
  other.secret = "another-clusters-secret-0123456789";
  auto stranger = NewUcxDataPlane(other).value();
  ASSERT_TRUE(stranger->Start(EchoHandler(&held_, &held_mu_)).ok());
  auto to_stranger =
      client_->SendSync(stranger->address(), EchoRequest(1, 8, 1), Ms(5000));
  EXPECT_EQ(to_stranger.status().code(), StatusCode::kUnauthenticated)
      << to_stranger.status().ToString();
  EXPECT_NE(to_stranger.status().message().find("different secrets?"),
            std::string::npos)
      << to_stranger.status().ToString();
  auto from_stranger =
      stranger->SendSync(server_->address(), EchoRequest(1, 8, 1), Ms(5000));
  EXPECT_EQ(from_stranger.status().code(), StatusCode::kUnauthenticated)
      << from_stranger.status().ToString();
  EXPECT_NE(from_stranger.status().message().find("different secrets?"),
            std::string::npos)
      << from_stranger.status().ToString();
  stranger->Shutdown();
  EXPECT_EQ(NewUcxDataPlane(DataPlaneOptions()).status().code(),
            StatusCode::kInvalidArgument);
}

// An authenticated peer that connects to the client's own listener cannot
// answer a request the client sent elsewhere: the answer must come over the
// connection the request went out on.
TEST_F(UcxDataPlaneTest, OnlyTheRequestsConnectionMayAnswerIt) {
  std::atomic<bool> answered{false};
  // Held by the server (step 999): the client's first request, id 1 << 32.
  client_->Send(server_->address(), EchoRequest(1, 8, 1, 999), Ms(3000),
                [&](StatusOr<Message>) { answered = true; });
  RawUcxPeer forger(client_->address());
  ASSERT_TRUE(forger.Authenticate(testing::kTestClusterSecret));
  WireHeader forged;
  forged.kind = static_cast<uint8_t>(MessageKind::kEcho);
  forged.request_id = uint64_t{1} << 32;
  forger.SendAndWait(&forged, sizeof(forged), "", Ms(300), kResponseAm);
  EXPECT_TRUE(forger.ClosedByServer(Ms(5000)));
  EXPECT_FALSE(answered.load());
}

class BackpressureTest : public UcxDataPlaneTest {
 protected:
  DataPlaneOptions ServerOptions() override {
    DataPlaneOptions o = testing::TestDataPlaneOptions();
    o.max_inflight_bytes = 1 << 20;  // Two 512 KiB requests at a time.
    return o;
  }

  // Answers the held requests as they come, `n` in all, each batch 20 ms
  // after the one before; the most that were held at once.
  size_t AnswerHeld(int n) {
    size_t max_held = 0;
    for (int answered = 0; answered < n;) {
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
      std::this_thread::sleep_for(Ms(20));
    }
    return max_held;
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
  // Answer held requests as they come; more arrive only as bytes drain.
  const size_t max_held = AnswerHeld(kRequests);
  const auto deadline = Clock::now() + Ms(10000);
  while (done.load() < kRequests && Clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(10));
  }
  EXPECT_EQ(done.load(), kRequests);
  EXPECT_LE(max_held, 2u) << "the server took more than its byte budget";
  EXPECT_GE(max_held, 1u);
}

class OwnBudgetTest : public BackpressureTest {
 protected:
  DataPlaneOptions ServerOptions() override {
    DataPlaneOptions o = BackpressureTest::ServerOptions();
    o.own_budget_kinds.insert(
        static_cast<uint8_t>(MessageKind::kReplicaForward));
    return o;
  }
};

// Echoes fill the server's budget and wait (the handler holds them); a
// large request of a kind with a budget of its own is still received and
// answered, and the echoes then drain.
TEST_F(OwnBudgetTest, AFullBudgetDoesNotHoldUpKindsWithTheirOwn) {
  constexpr int kEchoes = 4;
  std::atomic<int> echoes{0};
  for (int i = 0; i < kEchoes; ++i) {
    client_->Send(server_->address(), EchoRequest(128, 1024, i, 999), Ms(30000),
                  [&](StatusOr<Message> r) {
                    EXPECT_TRUE(r.ok()) << r.status().ToString();
                    ++echoes;
                  });
  }
  const auto held = [&] {
    std::lock_guard<std::mutex> lock(held_mu_);
    return held_.size();
  };
  auto deadline = Clock::now() + Ms(10000);
  while (held() < 2 && Clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(10));
  }
  ASSERT_EQ(held(), 2u) << "two 512 KiB echoes fill the 1 MiB budget";
  // 768 KiB: more than the echoes' budget has left (the echo handler
  // echoes it too).
  Message chunk = EchoRequest(192, 1024, 7);
  chunk.header.kind = static_cast<uint8_t>(MessageKind::kReplicaForward);
  std::atomic<int> chunks{0};
  client_->Send(server_->address(), std::move(chunk), Ms(30000),
                [&](StatusOr<Message> r) {
                  EXPECT_TRUE(r.ok()) << r.status().ToString();
                  ++chunks;
                });
  deadline = Clock::now() + Ms(10000);
  while (chunks.load() == 0 && Clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(10));
  }
  EXPECT_EQ(chunks.load(), 1) << "held up behind the echoes' budget";
  EXPECT_EQ(held(), 2u);
  AnswerHeld(kEchoes);
  deadline = Clock::now() + Ms(10000);
  while (echoes.load() < kEchoes && Clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(10));
  }
  EXPECT_EQ(echoes.load(), kEchoes);
}

}  // namespace
}  // namespace switchyard::transport::data_plane_testing
