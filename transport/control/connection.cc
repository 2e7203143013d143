#include "transport/control/connection.h"

#include "transport/control/asio_status.h"
#include "transport/control/auth.h"

namespace switchyard::control {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

namespace {

constexpr size_t kHandshakeReadBytes = 4 * 1024;
constexpr size_t kReadBytes = 64 * 1024;

// A peer that stops reading may leave at most this much queued for it.
size_t MaxWriteQueueBytes(const ControlOptions& options) {
  return 4 * options.max_frame_bytes + (1u << 20);
}

std::string PeerString(const tcp::socket& socket) {
  boost::system::error_code ec;
  const tcp::endpoint ep = socket.remote_endpoint(ec);
  if (ec) return "<unknown peer>";
  return ep.address().to_string() + ":" + std::to_string(ep.port());
}

}  // namespace

Status EnvelopeStatus(const Envelope& envelope) {
  if (envelope.body_case() != Envelope::kError) return OkStatus();
  return Status(StatusCodeFromName(envelope.error().code()),
                envelope.error().message());
}

Connection::Ptr Connection::Create(tcp::socket socket, Role role,
                                   ControlOptions options, Handlers handlers) {
  return Ptr(new Connection(std::move(socket), role, std::move(options),
                            std::move(handlers)));
}

Connection::Connection(tcp::socket socket, Role role, ControlOptions options,
                       Handlers handlers)
    : socket_(std::move(socket)),
      strand_(asio::make_strand(socket_.get_executor())),
      role_(role),
      options_(std::move(options)),
      handlers_(std::move(handlers)),
      peer_(PeerString(socket_)),
      handshake_timer_(strand_),
      decoder_(options_.max_handshake_frame_bytes),
      read_buffer_(kHandshakeReadBytes) {}

Connection::~Connection() = default;

void Connection::Start() {
  asio::post(strand_, [self = shared_from_this()] {
    self->handshake_timer_.expires_after(self->options_.handshake_timeout);
    self->handshake_timer_.async_wait([self](
                                          const boost::system::error_code& ec) {
      if (ec || self->state_ != State::kHandshake) return;
      self->CloseOnStrand(DeadlineExceededError(
          "handshake with " + self->peer_ + " not completed within " +
          std::to_string(self->options_.handshake_timeout.count()) + " ms"));
    });
    if (self->role_ == Role::kServer) {
      self->server_nonce_ = RandomNonce();
      Envelope challenge;
      challenge.mutable_challenge()->set_protocol_version(
          PROTOCOL_VERSION_CURRENT);
      challenge.mutable_challenge()->set_server_nonce(self->server_nonce_);
      self->Send(std::move(challenge));
    }
    self->DoRead();
  });
}

void Connection::DoRead() {
  socket_.async_read_some(
      asio::buffer(read_buffer_),
      asio::bind_executor(strand_, [self = shared_from_this()](
                                       const boost::system::error_code& ec,
                                       size_t bytes) {
        if (self->state_ == State::kClosed) return;
        if (ec) {
          if (ec == asio::error::eof && self->decoder_.buffered_bytes() > 0) {
            self->CloseOnStrand(
                DataLossError("truncated frame: peer closed with " +
                              std::to_string(self->decoder_.buffered_bytes()) +
                              " bytes of an incomplete frame"));
          } else {
            self->CloseOnStrand(ASIO_STATUS(ec, "read from " + self->peer_));
          }
          return;
        }
        self->decoder_.Feed(self->read_buffer_.data(), bytes);
        while (self->state_ != State::kClosed) {
          Envelope envelope;
          StatusOr<bool> next = self->decoder_.Next(&envelope);
          if (!next.ok()) {
            self->CloseOnStrand(next.status());
            return;
          }
          if (!*next) break;
          self->OnFrame(std::move(envelope));
        }
        if (self->state_ != State::kClosed) self->DoRead();
      }));
}

StatusOr<bool> Connection::OnHandshakeFrame(const Envelope& envelope) {
  if (envelope.body_case() == Envelope::kError) {
    return EnvelopeStatus(envelope).WithContext("peer refused the handshake");
  }
  if (role_ == Role::kServer) {
    if (envelope.body_case() != Envelope::kHello) {
      return UnauthenticatedError("expected Hello as the first message");
    }
    const Hello& hello = envelope.hello();
    if (hello.protocol_version() != PROTOCOL_VERSION_CURRENT) {
      return FailedPreconditionError(
          "protocol version " + std::to_string(hello.protocol_version()) +
          " is not supported (this server speaks " +
          std::to_string(PROTOCOL_VERSION_CURRENT) + ")");
    }
    client_nonce_ = hello.client_nonce();
    if (client_nonce_.size() != kNonceBytes ||
        !ProofsEqual(
            hello.client_proof(),
            ClientProof(options_.secret, server_nonce_, client_nonce_))) {
      return UnauthenticatedError("authentication failed (wrong secret?)");
    }
    Envelope welcome;
    welcome.mutable_welcome()->set_server_proof(
        ServerProof(options_.secret, server_nonce_, client_nonce_));
    Send(std::move(welcome));
    return true;
  }
  // Client side: Challenge, then Welcome.
  if (server_nonce_.empty()) {
    if (envelope.body_case() != Envelope::kChallenge) {
      return UnauthenticatedError("expected a Challenge from the server");
    }
    const Challenge& challenge = envelope.challenge();
    if (challenge.protocol_version() != PROTOCOL_VERSION_CURRENT) {
      return FailedPreconditionError(
          "server speaks protocol version " +
          std::to_string(challenge.protocol_version()) + ", this client " +
          std::to_string(PROTOCOL_VERSION_CURRENT));
    }
    if (challenge.server_nonce().size() != kNonceBytes) {
      return UnauthenticatedError("server nonce has the wrong size");
    }
    server_nonce_ = challenge.server_nonce();
    client_nonce_ = RandomNonce();
    Envelope hello;
    hello.mutable_hello()->set_protocol_version(PROTOCOL_VERSION_CURRENT);
    hello.mutable_hello()->set_client_nonce(client_nonce_);
    hello.mutable_hello()->set_client_proof(
        ClientProof(options_.secret, server_nonce_, client_nonce_));
    Send(std::move(hello));
    return false;  // Wait for Welcome.
  }
  if (envelope.body_case() != Envelope::kWelcome ||
      !ProofsEqual(
          envelope.welcome().server_proof(),
          ServerProof(options_.secret, server_nonce_, client_nonce_))) {
    return UnauthenticatedError(
        "server failed to prove it holds the secret (wrong secret?)");
  }
  return true;
}

void Connection::OnFrame(Envelope envelope) {
  if (state_ == State::kHandshake) {
    StatusOr<bool> done = OnHandshakeFrame(envelope);
    if (done.ok() && !*done) return;
    if (!done.ok()) {
      const Status& s = done.status();
      Envelope error;
      error.mutable_error()->set_code(std::string(StatusCodeName(s.code())));
      error.mutable_error()->set_message(s.message());
      if (envelope.body_case() == Envelope::kError) {
        CloseOnStrand(s);
      } else {
        FailAfterFlush(s, std::move(error));
      }
      return;
    }
    state_ = State::kReady;
    handshake_timer_.cancel();
    decoder_.set_max_frame_bytes(options_.max_frame_bytes);
    read_buffer_.resize(kReadBytes);
    if (handlers_.on_ready) handlers_.on_ready(shared_from_this());
    return;
  }
  if (envelope.is_response()) {
    auto it = pending_.find(envelope.request_id());
    if (it == pending_.end()) {
      VLOG(1) << "control: late or unknown response " << envelope.request_id()
              << " from " << peer_;
      return;
    }
    PendingCall call = std::move(it->second);
    pending_.erase(it);
    call.timer->cancel();
    Status s = EnvelopeStatus(envelope);
    if (s.ok()) {
      call.done(std::move(envelope));
    } else {
      call.done(s);
    }
    return;
  }
  if (envelope.request_id() == 0) {
    if (handlers_.on_push)
      handlers_.on_push(shared_from_this(), std::move(envelope));
    return;
  }
  if (handlers_.on_request) {
    handlers_.on_request(shared_from_this(), std::move(envelope));
  } else {
    ReplyError(envelope.request_id(),
               FailedPreconditionError("this endpoint serves no requests"));
  }
}

void Connection::Send(Envelope envelope) {
  if (state_ == State::kClosed || close_after_flush_) return;
  SendFrame(EncodeFrame(envelope));
}

void Connection::SendFrame(std::string frame) {
  if (state_ == State::kClosed || close_after_flush_) return;
  const size_t limit = state_ == State::kReady
                           ? options_.max_frame_bytes
                           : options_.max_handshake_frame_bytes;
  if (frame.size() - kFrameHeaderBytes > limit) {
    LOG(ERROR) << "control: dropping a " << frame.size() << "-byte message to "
               << peer_ << ": larger than the frame limit of " << limit;
    return;
  }
  write_queue_bytes_ += frame.size();
  if (write_queue_bytes_ > MaxWriteQueueBytes(options_)) {
    CloseOnStrand(ResourceExhaustedError("peer " + peer_ + " is not reading: " +
                                         std::to_string(write_queue_bytes_) +
                                         " bytes queued"));
    return;
  }
  write_queue_.push_back(std::move(frame));
  DoWrite();
}

void Connection::DoWrite() {
  if (writing_ || write_queue_.empty()) return;
  writing_ = true;
  asio::async_write(
      socket_, asio::buffer(write_queue_.front()),
      asio::bind_executor(
          strand_, [self = shared_from_this()](
                       const boost::system::error_code& ec, size_t) {
            self->writing_ = false;
            if (self->state_ == State::kClosed) return;
            if (ec) {
              self->CloseOnStrand(ASIO_STATUS(ec, "write to " + self->peer_));
              return;
            }
            self->write_queue_bytes_ -= self->write_queue_.front().size();
            self->write_queue_.pop_front();
            if (self->write_queue_.empty() && self->close_after_flush_) {
              self->CloseOnStrand(self->close_reason_);
              return;
            }
            self->DoWrite();
          }));
}

void Connection::FailAfterFlush(const Status& reason, Envelope error_reply) {
  Send(std::move(error_reply));
  close_after_flush_ = true;
  close_reason_ = reason;
  if (!writing_) CloseOnStrand(reason);
}

void Connection::Push(Envelope message) {
  message.set_request_id(0);
  message.set_is_response(false);
  asio::post(strand_,
             [self = shared_from_this(), m = std::move(message)]() mutable {
               if (self->state_ == State::kReady) self->Send(std::move(m));
             });
}

void Connection::PushEncoded(std::shared_ptr<const std::string> frame) {
  asio::post(strand_, [self = shared_from_this(), frame = std::move(frame)] {
    if (self->state_ == State::kReady) self->SendFrame(std::string(*frame));
  });
}

void Connection::Reply(uint64_t request_id, Envelope response) {
  response.set_request_id(request_id);
  response.set_is_response(true);
  asio::post(strand_,
             [self = shared_from_this(), m = std::move(response)]() mutable {
               if (self->state_ == State::kReady) self->Send(std::move(m));
             });
}

void Connection::ReplyError(uint64_t request_id, const Status& status) {
  Envelope error;
  error.mutable_error()->set_code(std::string(StatusCodeName(status.code())));
  error.mutable_error()->set_message(status.message());
  Reply(request_id, std::move(error));
}

void Connection::Call(Envelope request, std::chrono::milliseconds timeout,
                      CallDone done) {
  asio::post(strand_, [self = shared_from_this(), m = std::move(request),
                       timeout, done = std::move(done)]() mutable {
    if (self->state_ != State::kReady) {
      done(UnavailableError("control connection to " + self->peer_ +
                            " is not ready"));
      return;
    }
    const uint64_t id = self->next_request_id_++;
    m.set_request_id(id);
    m.set_is_response(false);
    PendingCall call;
    call.done = std::move(done);
    call.timer = std::make_unique<asio::steady_timer>(self->strand_);
    call.timer->expires_after(timeout);
    call.timer->async_wait([self, id,
                            timeout](const boost::system::error_code& ec) {
      if (ec) return;
      auto it = self->pending_.find(id);
      if (it == self->pending_.end()) return;
      CallDone cb = std::move(it->second.done);
      self->pending_.erase(it);
      cb(DeadlineExceededError("no response from " + self->peer_ + " within " +
                               std::to_string(timeout.count()) + " ms"));
    });
    self->pending_.emplace(id, std::move(call));
    self->Send(std::move(m));
  });
}

void Connection::Close(const Status& reason) {
  asio::post(strand_, [self = shared_from_this(), reason] {
    self->CloseOnStrand(reason);
  });
}

void Connection::CloseOnStrand(const Status& reason) {
  if (state_ == State::kClosed) return;
  const bool was_ready = state_ == State::kReady;
  state_ = State::kClosed;
  if (reason.code() != StatusCode::kCancelled) {
    if (was_ready && reason.code() == StatusCode::kUnavailable) {
      VLOG(1) << "control: connection with " << peer_
              << " closed: " << reason.ToString();
    } else {
      LOG(WARNING) << "control: closing connection with " << peer_ << ": "
                   << reason.ToString();
    }
  }
  boost::system::error_code ignored;
  socket_.shutdown(tcp::socket::shutdown_both, ignored);
  socket_.close(ignored);
  handshake_timer_.cancel();
  auto pending = std::move(pending_);
  pending_.clear();
  const Status lost = UnavailableError("control connection to " + peer_ +
                                       " lost: " + reason.ToString());
  for (auto& [id, call] : pending) {
    call.timer->cancel();
    call.done(lost);
  }
  if (handlers_.on_close) handlers_.on_close(shared_from_this(), reason);
  handlers_ = Handlers();  // Break reference cycles through captured state.
}

}  // namespace switchyard::control
