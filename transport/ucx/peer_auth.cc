#include "transport/ucx/peer_auth.h"

#include <cstring>

#include "transport/control/auth.h"

namespace switchyard::transport {

AuthMessage MakeAuthMessage(AuthStep step, std::string_view nonce,
                            std::string_view proof) {
  CHECK(nonce.empty() || nonce.size() == kAuthFieldBytes);
  CHECK(proof.empty() || proof.size() == kAuthFieldBytes);
  AuthMessage message;
  message.step = static_cast<uint8_t>(step);
  // An empty view's data() may be null, which memcpy must not get even for
  // no bytes (UBSan, in fuzz/seed_corpus.cc).
  if (!nonce.empty()) std::memcpy(message.nonce, nonce.data(), nonce.size());
  if (!proof.empty()) std::memcpy(message.proof, proof.data(), proof.size());
  return message;
}

StatusOr<AuthMessage> ParseAuthMessage(const void* bytes, size_t length) {
  if (length != sizeof(AuthMessage)) {
    return UnauthenticatedError("handshake message of " +
                                std::to_string(length) + " bytes (expected " +
                                std::to_string(sizeof(AuthMessage)) + ")");
  }
  AuthMessage message;
  std::memcpy(&message, bytes, sizeof(message));
  if (message.magic != kAuthMagic) {
    return UnauthenticatedError("handshake message with a bad magic");
  }
  if (message.version != kAuthVersion) {
    return FailedPreconditionError("data-plane handshake version " +
                                   std::to_string(message.version) +
                                   " is not supported (this process speaks " +
                                   std::to_string(kAuthVersion) + ")");
  }
  if (message.step < static_cast<uint8_t>(AuthStep::kHello) ||
      message.step > static_cast<uint8_t>(AuthStep::kRefused)) {
    return UnauthenticatedError("handshake message of unknown step " +
                                std::to_string(message.step));
  }
  return message;
}

std::string DataServerProof(const std::string& secret,
                            std::string_view server_nonce,
                            std::string_view client_nonce) {
  return control::HandshakeProof(secret, "switchyard-data-server", client_nonce,
                                 server_nonce);
}

std::string DataClientProof(const std::string& secret,
                            std::string_view server_nonce,
                            std::string_view client_nonce) {
  return control::HandshakeProof(secret, "switchyard-data-client", server_nonce,
                                 client_nonce);
}

}  // namespace switchyard::transport
