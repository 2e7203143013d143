// One authenticated control-plane connection (docs/protocol.md).
//
// A Connection owns its TCP socket. It runs the HMAC handshake for its role,
// then reads frames: responses complete the matching Call, requests go to
// on_request, pushes (request_id 0) to on_push. Every Call has a deadline.
// Anything malformed (bad magic, oversized, truncated or unparseable frame,
// failed authentication, protocol version mismatch, a peer that does not read)
// closes this one connection with a logged reason; nothing a peer sends can
// crash the process. Before authentication a connection holds a few KiB at
// most: frames are limited to max_handshake_frame_bytes and the handshake has
// a deadline.
//
// Thread-safety: public methods may be called from any thread; all handlers
// run on the connection's strand. Connections are shared_ptr-owned; handlers
// receive the owning pointer. The destructor never blocks.
#ifndef SWITCHYARD_TRANSPORT_CONTROL_CONNECTION_H_
#define SWITCHYARD_TRANSPORT_CONTROL_CONNECTION_H_

#include <boost/asio.hpp>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "control.pb.h"
#include "transport/control/frame.h"

namespace switchyard::control {

struct ControlOptions {
  // Shared secret (ReadSecretFile); both ends must hold the same bytes.
  std::string secret;
  // Largest frame accepted from an authenticated peer.
  size_t max_frame_bytes = 64u << 20;
  // Until the handshake completes the peer is unknown: its frames may hold at
  // most this many bytes, and it must finish within handshake_timeout.
  size_t max_handshake_frame_bytes = 4096;
  std::chrono::milliseconds handshake_timeout{5000};
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  using Ptr = std::shared_ptr<Connection>;
  enum class Role { kClient, kServer };
  struct Handlers {
    std::function<void(const Ptr&)> on_ready;
    std::function<void(const Ptr&, Envelope)> on_request;
    std::function<void(const Ptr&, Envelope)> on_push;
    // Called exactly once, when the connection closes for any reason.
    std::function<void(const Ptr&, const Status&)> on_close;
  };
  // Receives the response, or the peer's Error as a Status, or a local error
  // (deadline, connection lost).
  using CallDone = std::function<void(StatusOr<Envelope>)>;

  static Ptr Create(boost::asio::ip::tcp::socket socket, Role role,
                    ControlOptions options, Handlers handlers);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Begins the handshake. Call once.
  void Start();
  // Sends a server push (request_id 0).
  void Push(Envelope message);
  // Sends a push already encoded (EncodeFrame of an Envelope with
  // request_id 0): one encoding shared by every connection it goes to.
  void PushEncoded(std::shared_ptr<const std::string> frame);
  // Answers `request_id` with `response`.
  void Reply(uint64_t request_id, Envelope response);
  // Answers `request_id` with an Error carrying `status`.
  void ReplyError(uint64_t request_id, const Status& status);
  // Sends a request; `done` runs exactly once, at the latest when `timeout`
  // expires.
  void Call(Envelope request, std::chrono::milliseconds timeout, CallDone done);
  // Closes the connection; pending calls complete with `reason`.
  void Close(const Status& reason);

  // "ip:port" of the peer.
  const std::string& peer() const { return peer_; }

 private:
  enum class State { kHandshake, kReady, kClosed };
  struct PendingCall {
    CallDone done;
    std::unique_ptr<boost::asio::steady_timer> timer;
  };

  Connection(boost::asio::ip::tcp::socket socket, Role role,
             ControlOptions options, Handlers handlers);

  void DoRead();
  void OnFrame(Envelope envelope);
  // True once the handshake is complete, false while it continues.
  StatusOr<bool> OnHandshakeFrame(const Envelope& envelope);
  void Send(Envelope envelope);
  // Queues an encoded frame (checked against the frame limit).
  void SendFrame(std::string frame);
  void DoWrite();
  void CloseOnStrand(const Status& reason);
  void FailAfterFlush(const Status& reason, Envelope error_reply);

  boost::asio::ip::tcp::socket socket_;
  boost::asio::strand<boost::asio::any_io_executor> strand_;
  const Role role_;
  const ControlOptions options_;
  Handlers handlers_;
  std::string peer_;

  // All below are touched only on strand_.
  State state_ = State::kHandshake;
  boost::asio::steady_timer handshake_timer_;
  std::string server_nonce_;
  std::string client_nonce_;
  FrameDecoder decoder_;
  // Small until the handshake completes.
  std::vector<char> read_buffer_;
  std::deque<std::string> write_queue_;
  size_t write_queue_bytes_ = 0;
  bool writing_ = false;
  bool close_after_flush_ = false;
  Status close_reason_;
  uint64_t next_request_id_ = 1;
  std::map<uint64_t, PendingCall> pending_;
};

// Converts an Envelope carrying an Error into its Status; any other body is
// OK.
Status EnvelopeStatus(const Envelope& envelope);

}  // namespace switchyard::control

#endif  // SWITCHYARD_TRANSPORT_CONTROL_CONNECTION_H_
