#include "transport/control/auth.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace switchyard::control {
namespace {

std::string Hmac(const std::string& secret, const std::string& message) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int out_len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(message.data()), message.size(),
       out, &out_len);
  return std::string(reinterpret_cast<char*>(out), out_len);
}

}  // namespace

StatusOr<std::string> ReadSecretFile(const std::string& path) {
  if (path.empty()) {
    return InvalidArgumentError(
        "no secret file: set cluster.secret_file or pass --secret-file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return NotFoundError("cannot read secret file '" + path +
                         "': " + std::strerror(errno));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  std::string secret = buf.str();
  while (!secret.empty() &&
         std::isspace(static_cast<unsigned char>(secret.back()))) {
    secret.pop_back();
  }
  if (secret.size() < kMinSecretBytes) {
    return InvalidArgumentError(
        "secret file '" + path + "' holds " + std::to_string(secret.size()) +
        " bytes; at least " + std::to_string(kMinSecretBytes) +
        " are required");
  }
  return secret;
}

Status WriteNewSecretFile(const std::string& path) {
  unsigned char raw[32];
  if (RAND_bytes(raw, sizeof(raw)) != 1) {
    return InternalError("RAND_bytes failed");
  }
  static const char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned char b : raw) {
    hex += kHex[b >> 4];
    hex += kHex[b & 15];
  }
  hex += "\n";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) {
    return UnavailableError("cannot create secret file '" + path +
                            "': " + std::strerror(errno));
  }
  const ssize_t written = ::write(fd, hex.data(), hex.size());
  ::close(fd);
  if (written != static_cast<ssize_t>(hex.size())) {
    return UnavailableError("cannot write secret file '" + path + "'");
  }
  return OkStatus();
}

std::string RandomNonce() {
  std::string nonce(kNonceBytes, '\0');
  CHECK_EQ(RAND_bytes(reinterpret_cast<unsigned char*>(nonce.data()),
                      static_cast<int>(nonce.size())),
           1);
  return nonce;
}

std::string HandshakeProof(const std::string& secret, std::string_view label,
                           std::string_view first, std::string_view second) {
  std::string message;
  message.reserve(label.size() + first.size() + second.size());
  message.append(label).append(first).append(second);
  return Hmac(secret, message);
}

std::string ClientProof(const std::string& secret,
                        const std::string& server_nonce,
                        const std::string& client_nonce) {
  return HandshakeProof(secret, "switchyard-client", server_nonce,
                        client_nonce);
}

std::string ServerProof(const std::string& secret,
                        const std::string& server_nonce,
                        const std::string& client_nonce) {
  return HandshakeProof(secret, "switchyard-server", client_nonce,
                        server_nonce);
}

bool ProofsEqual(const std::string& a, const std::string& b) {
  return a.size() == b.size() &&
         CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace switchyard::control
