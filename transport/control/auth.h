// Shared-secret authentication for control connections.
//
// The server sends a random nonce; the client answers with its own nonce and
// HMAC-SHA256(secret, "switchyard-client" || server_nonce || client_nonce);
// the server proves itself back with the mirrored HMAC. The secret itself
// never crosses the wire. Stateless functions; thread-safe.
#ifndef SWITCHYARD_TRANSPORT_CONTROL_AUTH_H_
#define SWITCHYARD_TRANSPORT_CONTROL_AUTH_H_

#include <string>
#include <string_view>

#include "common/status.h"

namespace switchyard::control {

constexpr size_t kNonceBytes = 32;
constexpr size_t kMinSecretBytes = 16;

// Reads the secret from `path`, dropping trailing whitespace. Fails if the
// file is missing or holds fewer than kMinSecretBytes bytes.
StatusOr<std::string> ReadSecretFile(const std::string& path);

// Writes a fresh random secret (64 hex characters) to `path` with mode 0600.
Status WriteNewSecretFile(const std::string& path);

std::string RandomNonce();

// HMAC-SHA256(secret, label || first || second): one side's proof in a
// challenge-response handshake. Distinct labels keep proofs of one protocol
// or role from serving another.
std::string HandshakeProof(const std::string& secret, std::string_view label,
                           std::string_view first, std::string_view second);

std::string ClientProof(const std::string& secret,
                        const std::string& server_nonce,
                        const std::string& client_nonce);
std::string ServerProof(const std::string& secret,
                        const std::string& server_nonce,
                        const std::string& client_nonce);

// Constant-time comparison.
bool ProofsEqual(const std::string& a, const std::string& b);

}  // namespace switchyard::control

#endif  // SWITCHYARD_TRANSPORT_CONTROL_AUTH_H_
