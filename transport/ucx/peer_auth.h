// The data-plane handshake's messages and proofs (docs/protocol.md, "Data
// plane", "Authentication"). Every UCX connection proves, both ways, that
// its ends hold the cluster secret before any request crosses it:
//
//   client -> server  Hello     {client_nonce}
//   server -> client  Challenge {server_nonce, server_proof}
//   client -> server  Proof     {client_proof}
//   server -> client  Accepted            (or Refused, then the server
//                                          closes the connection)
//
// server_proof = HMAC-SHA256(secret, "switchyard-data-server" ||
// client_nonce || server_nonce), client_proof = HMAC-SHA256(secret,
// "switchyard-data-client" || server_nonce || client_nonce): fresh nonces
// from both ends bind each proof to its connection, and the labels keep a
// control-plane proof from serving here. Each message is one active message
// (kAuthAm) whose header is an AuthMessage and which has no payload.
//
// Pure functions and a plain struct: no UCX, thread-safe.
#ifndef SWITCHYARD_TRANSPORT_UCX_PEER_AUTH_H_
#define SWITCHYARD_TRANSPORT_UCX_PEER_AUTH_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace switchyard::transport {

constexpr unsigned kAuthAm = 3;
constexpr uint32_t kAuthMagic = 0x31415953;  // "SYA1" little-endian.
constexpr uint16_t kAuthVersion = 1;
constexpr size_t kAuthFieldBytes = 32;

enum class AuthStep : uint8_t {
  kHello = 1,
  kChallenge = 2,
  kProof = 3,
  kAccepted = 4,
  kRefused = 5,
};

struct AuthMessage {
  uint32_t magic = kAuthMagic;
  uint16_t version = kAuthVersion;
  uint8_t step = 0;  // AuthStep
  uint8_t reserved = 0;
  uint8_t nonce[kAuthFieldBytes] = {};
  uint8_t proof[kAuthFieldBytes] = {};

  AuthStep auth_step() const { return static_cast<AuthStep>(step); }
  std::string nonce_bytes() const {
    return std::string(reinterpret_cast<const char*>(nonce), sizeof(nonce));
  }
  std::string proof_bytes() const {
    return std::string(reinterpret_cast<const char*>(proof), sizeof(proof));
  }
};
static_assert(sizeof(AuthMessage) == 72, "the auth message is 72 bytes");

// A message of `step`; `nonce` and `proof` are empty or kAuthFieldBytes
// long.
AuthMessage MakeAuthMessage(AuthStep step, std::string_view nonce = {},
                            std::string_view proof = {});

// The message in `bytes`, or an error for a wrong size, magic, version or
// step.
StatusOr<AuthMessage> ParseAuthMessage(const void* bytes, size_t length);

std::string DataServerProof(const std::string& secret,
                            std::string_view server_nonce,
                            std::string_view client_nonce);
std::string DataClientProof(const std::string& secret,
                            std::string_view server_nonce,
                            std::string_view client_nonce);

}  // namespace switchyard::transport

#endif  // SWITCHYARD_TRANSPORT_UCX_PEER_AUTH_H_
