// The control plane over real loopback sockets: authentication, deadlines,
// pushes, reconnects, and hostile peers.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>

#include "tests/testing/sockets.h"
#include "transport/control/auth.h"
#include "transport/control/client.h"
#include "transport/control/server.h"

namespace switchyard::control {
namespace {

using Ms = std::chrono::milliseconds;
namespace asio = boost::asio;

constexpr char kSecret[] = "0123456789abcdef0123456789abcdef";

// A raw TCP peer with a 5 s receive timeout, so that a test can never hang.
class RawPeer {
 public:
  explicit RawPeer(uint16_t port, timeval receive_timeout = {5, 0}) {
    fd_ = testing::ConnectToLoopback(port, &connected_);
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &receive_timeout,
                 sizeof(receive_timeout));
  }
  ~RawPeer() { ::close(fd_); }
  bool connected() const { return connected_; }
  void Send(const std::string& bytes) {
    ASSERT_EQ(::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
  }
  void CloseWrite() { ::shutdown(fd_, SHUT_WR); }
  // Reads one frame (the server's Challenge first).
  Envelope ReadFrame() {
    FrameDecoder decoder(1 << 20);
    Envelope e;
    char buf[4096];
    while (true) {
      auto r = decoder.Next(&e);
      if (!r.ok() || *r) return e;
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) return e;
      decoder.Feed(buf, n);
    }
  }
  // True if the server closes the connection within the receive timeout.
  bool ClosedByServer() {
    char buf[4096];
    while (true) {
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n == 0) return true;
      if (n < 0) return errno == ECONNRESET;
    }
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
};

class ControlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    work_.emplace(asio::make_work_guard(io_));
    for (int i = 0; i < 2; ++i) threads_.emplace_back([this] { io_.run(); });
    StartServer(0);
  }
  void TearDown() override {
    for (auto& c : clients_) c->Shutdown();
    if (server_) server_->Shutdown();
    std::this_thread::sleep_for(Ms(50));
    work_.reset();
    io_.stop();
    for (auto& t : threads_) t.join();
    server_.reset();
  }

  void StartServer(uint16_t port, const std::string& host = "127.0.0.1",
                   Ms handshake_timeout = Ms(1000),
                   AdmissionLimits limits = {}) {
    ControlOptions options;
    options.secret = kSecret;
    options.max_frame_bytes = 64 * 1024;
    options.handshake_timeout = handshake_timeout;
    Connection::Handlers handlers;
    handlers.on_ready = [](const Connection::Ptr& conn) {
      Envelope hello_push;
      hello_push.mutable_routing_table()->set_epoch(7);
      conn->Push(hello_push);
    };
    handlers.on_request = [this](const Connection::Ptr& conn, Envelope req) {
      ++requests_;
      if (req.body_case() == Envelope::kStatusRequest) {
        Envelope resp;
        resp.mutable_status_response()->set_epoch(42);
        conn->Reply(req.request_id(), resp);
      } else if (req.body_case() == Envelope::kLeave) {
        conn->ReplyError(req.request_id(), NotFoundError("no such member"));
      }
      // Heartbeats are left unanswered: the silent-peer case.
    };
    server_ = std::make_unique<ControlServer>(io_, options, handlers, limits);
    ASSERT_TRUE(server_->Listen({host, port}).ok());
    port_ = server_->port();
  }

  // Shuts the server down and keeps it until the fixture goes: destroying
  // a ControlServer requires a stopped io_context (TearDown stops it), and
  // its I/O objects must go before the io_context does (retired_ is
  // declared after io_). A static list outlived io_: its timers then
  // touched freed services at exit (ASan).
  void RetireServer() {
    server_->Shutdown();
    retired_.push_back(std::move(server_));
  }

  ControlClient::Ptr NewClient(const std::string& secret,
                               std::function<void()> on_connected = nullptr,
                               std::function<void(Envelope)> on_push = nullptr,
                               const std::string& host = "127.0.0.1") {
    ClientOptions options;
    options.server = {host, port_};
    options.control.secret = secret;
    options.control.handshake_timeout = Ms(1000);
    options.min_backoff = Ms(20);
    options.max_backoff = Ms(200);
    auto client = ControlClient::Create(io_, options, std::move(on_connected),
                                        std::move(on_push));
    client->Start();
    clients_.push_back(client);
    return client;
  }

  Envelope StatusRequest() {
    Envelope e;
    e.mutable_status_request();
    return e;
  }

  asio::io_context io_;
  std::vector<std::unique_ptr<ControlServer>> retired_;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>>
      work_;
  std::vector<std::thread> threads_;
  std::unique_ptr<ControlServer> server_;
  std::vector<ControlClient::Ptr> clients_;
  uint16_t port_ = 0;
  std::atomic<int> requests_{0};
};

TEST_F(ControlTest, RequestResponseAndPush) {
  std::promise<uint64_t> pushed;
  auto client = NewClient(kSecret, nullptr, [&](Envelope e) {
    if (e.body_case() == Envelope::kRoutingTable) {
      pushed.set_value(e.routing_table().epoch());
    }
  });
  ASSERT_TRUE(client->WaitConnected(Ms(5000)).ok());
  auto r = client->CallSync(StatusRequest(), Ms(2000));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->status_response().epoch(), 42u);
  auto f = pushed.get_future();
  ASSERT_EQ(f.wait_for(Ms(5000)), std::future_status::ready);
  EXPECT_EQ(f.get(), 7u);
  // An Error reply arrives as the peer's Status.
  Envelope leave;
  leave.mutable_leave()->set_name("x");
  auto err = client->CallSync(leave, Ms(2000));
  EXPECT_EQ(err.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(err.status().message(), "no such member");
}

TEST_F(ControlTest, WrongSecretIsRejectedAndServerKeepsServing) {
  auto bad = NewClient("this-is-the-wrong-secret-entirely");
  Status s = bad->WaitConnected(Ms(1500));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("authentication failed"), std::string::npos)
      << s.ToString();
  EXPECT_EQ(requests_.load(), 0);
  auto good = NewClient(kSecret);
  ASSERT_TRUE(good->WaitConnected(Ms(5000)).ok());
  EXPECT_TRUE(good->CallSync(StatusRequest(), Ms(2000)).ok());
}

// One config file names the coordinator for every process, so names work
// on both ends: the server binds the name's address, the client resolves
// it (trying each address "localhost" has) on every attempt.
TEST_F(ControlTest, HostNamesAreResolvedOnBothEnds) {
  RetireServer();
  StartServer(0, "localhost");
  auto client = NewClient(kSecret, nullptr, nullptr, "localhost");
  ASSERT_TRUE(client->WaitConnected(Ms(5000)).ok());
  auto r = client->CallSync(StatusRequest(), Ms(2000));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->status_response().epoch(), 42u);
}

TEST_F(ControlTest, AnUnresolvableHostIsNamedAndRetried) {
  auto client = NewClient(kSecret, nullptr, nullptr, "no-such-host.invalid");
  Status s = client->WaitConnected(Ms(1500));
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("resolve coordinator host 'no-such-host.invalid'"),
            std::string::npos)
      << s.ToString();
  ControlServer server(io_, ControlOptions(), Connection::Handlers());
  const Status listen = server.Listen({"no-such-host.invalid", 0});
  EXPECT_EQ(listen.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(listen.message().find("cannot resolve host 'no-such-host.invalid'"),
            std::string::npos)
      << listen.ToString();
}

TEST_F(ControlTest, SilentPeerGivesDeadlineNotHang) {
  auto client = NewClient(kSecret);
  ASSERT_TRUE(client->WaitConnected(Ms(5000)).ok());
  Envelope beat;
  beat.mutable_heartbeat()->set_name("w");
  const auto start = std::chrono::steady_clock::now();
  auto r = client->CallSync(beat, Ms(200));
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(r.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_LT(elapsed, Ms(2000));
  // The connection stays usable after a timed-out call.
  EXPECT_TRUE(client->CallSync(StatusRequest(), Ms(2000)).ok());
}

TEST_F(ControlTest, SilentServerFailsTheHandshakeInTime) {
  // A TCP listener that accepts and never speaks.
  asio::ip::tcp::acceptor mute(io_, {asio::ip::make_address("127.0.0.1"), 0});
  const uint16_t mute_port = mute.local_endpoint().port();
  ClientOptions options;
  options.server = {"127.0.0.1", mute_port};
  options.control.secret = kSecret;
  options.control.handshake_timeout = Ms(300);
  auto client = ControlClient::Create(io_, options, nullptr, nullptr);
  client->Start();
  clients_.push_back(client);
  const auto start = std::chrono::steady_clock::now();
  Status s = client->WaitConnected(Ms(1500));
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded);
  EXPECT_LT(std::chrono::steady_clock::now() - start, Ms(3000));
  auto r = client->CallSync(StatusRequest(), Ms(200));
  EXPECT_EQ(r.status().code(), StatusCode::kUnavailable);
}

TEST_F(ControlTest, HostileFramesCloseOnlyThatConnection) {
  auto good = NewClient(kSecret);
  ASSERT_TRUE(good->WaitConnected(Ms(5000)).ok());
  struct Case {
    const char* what;
    std::string bytes;
    bool close_write;
  };
  std::string oversized = "SYC1";
  oversized += std::string("\x7f\xff\xff\xff", 4);
  std::string truncated = EncodeFrame(StatusRequest()).substr(0, 5);
  std::string unparseable = "SYC1";
  unparseable += std::string("\0\0\0\3", 4) + "\xff\xff\xff";
  Envelope no_hello;
  no_hello.set_request_id(1);
  no_hello.mutable_status_request();
  Envelope old_version;
  old_version.mutable_hello()->set_protocol_version(99);
  const std::vector<Case> cases = {
      {"garbage", "GET / HTTP/1.1\r\nHost: x\r\n\r\n", false},
      {"oversized", oversized, false},
      {"truncated", truncated, true},
      {"unparseable", unparseable, false},
      {"request before auth", EncodeFrame(no_hello), false},
      {"protocol version 99", EncodeFrame(old_version), false},
  };
  for (const Case& c : cases) {
    RawPeer peer(port_);
    ASSERT_TRUE(peer.connected()) << c.what;
    Envelope challenge = peer.ReadFrame();
    ASSERT_EQ(challenge.body_case(), Envelope::kChallenge) << c.what;
    peer.Send(c.bytes);
    if (c.close_write) peer.CloseWrite();
    EXPECT_TRUE(peer.ClosedByServer()) << c.what;
    // The server still serves its authenticated client.
    EXPECT_TRUE(good->CallSync(StatusRequest(), Ms(2000)).ok()) << c.what;
  }
  EXPECT_EQ(requests_.load(), static_cast<int>(cases.size()));
}

// Before the handshake a peer is unknown: a frame larger than a handshake
// needs is refused from its header, long before the handshake deadline (30 s
// here; the peer gives up after 5 s), even though an authenticated peer may
// send it.
TEST_F(ControlTest, FramesBeforeAuthenticationAreSmall) {
  RetireServer();
  StartServer(0, "127.0.0.1", Ms(30000));
  RawPeer peer(port_);
  ASSERT_TRUE(peer.connected());
  ASSERT_EQ(peer.ReadFrame().body_case(), Envelope::kChallenge);
  const uint32_t length = 32 * 1024;  // Under max_frame_bytes (64 KiB).
  std::string header = "SYC1";
  for (int shift : {24, 16, 8, 0}) header += static_cast<char>(length >> shift);
  peer.Send(header + std::string(length - 1, 'x'));
  EXPECT_TRUE(peer.ClosedByServer());
  // An authenticated client may still send frames that large.
  auto good = NewClient(kSecret);
  ASSERT_TRUE(good->WaitConnected(Ms(5000)).ok());
  Envelope big;
  big.mutable_heartbeat()->set_name(std::string(length, 'w'));
  EXPECT_EQ(good->CallSync(big, Ms(300)).status().code(),
            StatusCode::kDeadlineExceeded);  // Heartbeats go unanswered.
  EXPECT_TRUE(good->CallSync(StatusRequest(), Ms(2000)).ok());
}

// A flood of peers that connect and never authenticate: the server keeps at
// most max_handshakes_per_address of them (it drops the oldest), and a member
// that connects after the flood is served.
TEST_F(ControlTest, IdleHandshakesAreBoundedAndCannotLockOutAMember) {
  RetireServer();
  AdmissionLimits limits;
  limits.max_handshakes = 16;
  limits.max_handshakes_per_address = 8;
  StartServer(0, "127.0.0.1", Ms(30000), limits);
  constexpr int kFlood = 300;
  std::vector<std::unique_ptr<RawPeer>> flood;
  for (int i = 0; i < kFlood; ++i) {
    flood.push_back(std::make_unique<RawPeer>(port_, timeval{0, 200000}));
    ASSERT_TRUE(flood.back()->connected()) << i;
  }
  auto good = NewClient(kSecret);
  ASSERT_TRUE(good->WaitConnected(Ms(5000)).ok());
  EXPECT_TRUE(good->CallSync(StatusRequest(), Ms(2000)).ok());
  EXPECT_LE(server_->handshakes_in_progress(),
            limits.max_handshakes_per_address);
  // All but the newest few were closed by the server, long before the 30 s
  // handshake deadline.
  int closed = 0;
  for (auto& peer : flood) closed += peer->ClosedByServer() ? 1 : 0;
  EXPECT_GE(closed,
            kFlood - static_cast<int>(limits.max_handshakes_per_address));
}

TEST_F(ControlTest, ProtocolVersionMismatchIsExplained) {
  RawPeer peer(port_);
  ASSERT_TRUE(peer.connected());
  ASSERT_EQ(peer.ReadFrame().body_case(), Envelope::kChallenge);
  Envelope hello;
  hello.mutable_hello()->set_protocol_version(99);
  peer.Send(EncodeFrame(hello));
  Envelope reply = peer.ReadFrame();
  ASSERT_EQ(reply.body_case(), Envelope::kError);
  EXPECT_EQ(reply.error().code(), "FAILED_PRECONDITION");
  EXPECT_NE(reply.error().message().find("protocol version 99"),
            std::string::npos);
  EXPECT_TRUE(peer.ClosedByServer());
}

TEST_F(ControlTest, ClientReconnectsAfterServerRestart) {
  std::atomic<int> connects{0};
  auto client = NewClient(kSecret, [&] { ++connects; });
  ASSERT_TRUE(client->WaitConnected(Ms(5000)).ok());
  const uint16_t port = port_;
  RetireServer();
  std::this_thread::sleep_for(Ms(100));
  auto r = client->CallSync(StatusRequest(), Ms(500));
  EXPECT_FALSE(r.ok());
  StartServer(port);
  const auto deadline = std::chrono::steady_clock::now() + Ms(5000);
  while (connects.load() < 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(Ms(20));
  }
  EXPECT_EQ(connects.load(), 2);
  EXPECT_TRUE(client->CallSync(StatusRequest(), Ms(2000)).ok());
}

TEST(AuthTest, ProofsDependOnSecretAndNonces) {
  const std::string a = RandomNonce(), b = RandomNonce();
  EXPECT_NE(a, b);
  EXPECT_EQ(a.size(), kNonceBytes);
  const std::string proof = ClientProof(kSecret, a, b);
  EXPECT_TRUE(ProofsEqual(proof, ClientProof(kSecret, a, b)));
  EXPECT_FALSE(ProofsEqual(proof, ClientProof("another secret value!", a, b)));
  EXPECT_FALSE(ProofsEqual(proof, ClientProof(kSecret, b, a)));
  EXPECT_FALSE(ProofsEqual(proof, ServerProof(kSecret, a, b)));
  EXPECT_EQ(proof.find(kSecret), std::string::npos);
}

TEST(AuthTest, SecretFiles) {
  const std::string dir = ::testing::TempDir();
  const std::string path = dir + "/secret_test_file";
  ASSERT_TRUE(WriteNewSecretFile(path).ok());
  auto secret = ReadSecretFile(path);
  ASSERT_TRUE(secret.ok());
  EXPECT_EQ(secret->size(), 64u);
  EXPECT_EQ(ReadSecretFile(dir + "/no_such_secret").status().code(),
            StatusCode::kNotFound);
  {
    std::FILE* f = std::fopen(path.c_str(), "w");
    std::fputs("short\n", f);
    std::fclose(f);
  }
  EXPECT_EQ(ReadSecretFile(path).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadSecretFile("").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace switchyard::control
