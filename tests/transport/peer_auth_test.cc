// The data-plane handshake's messages (transport/ucx/peer_auth.h), without
// UCX: what MakeAuthMessage builds, ParseAuthMessage takes back, and every
// malformed message it refuses.
#include "transport/ucx/peer_auth.h"

#include <gtest/gtest.h>

#include <cstring>

namespace switchyard::transport {
namespace {

// Messages without a nonce or a proof (Hello has no proof, Accepted
// neither): an empty view's data() may be null, which memcpy must never
// get (UBSan flagged it in fuzz/seed_corpus.cc).
TEST(PeerAuthTest, MessagesWithoutNonceOrProofRoundTrip) {
  const std::string nonce(kAuthFieldBytes, 'n');
  for (const AuthMessage& m :
       {MakeAuthMessage(AuthStep::kHello, nonce),
        MakeAuthMessage(AuthStep::kAccepted),
        MakeAuthMessage(AuthStep::kProof, {}, std::string(32, 'p'))}) {
    auto parsed = ParseAuthMessage(&m, sizeof(m));
    ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
    EXPECT_EQ(parsed->step, m.step);
    EXPECT_EQ(parsed->nonce_bytes(), m.nonce_bytes());
    EXPECT_EQ(parsed->proof_bytes(), m.proof_bytes());
  }
  const AuthMessage accepted = MakeAuthMessage(AuthStep::kAccepted);
  EXPECT_EQ(accepted.nonce_bytes(), std::string(kAuthFieldBytes, '\0'));
  EXPECT_EQ(accepted.proof_bytes(), std::string(kAuthFieldBytes, '\0'));
}

TEST(PeerAuthTest, MalformedMessagesAreRefused) {
  const AuthMessage hello =
      MakeAuthMessage(AuthStep::kHello, std::string(kAuthFieldBytes, 'n'));
  EXPECT_EQ(ParseAuthMessage(&hello, sizeof(hello) - 1).status().code(),
            StatusCode::kUnauthenticated);
  EXPECT_EQ(ParseAuthMessage(nullptr, 0).status().code(),
            StatusCode::kUnauthenticated);
  AuthMessage m = hello;
  m.magic ^= 1;
  EXPECT_EQ(ParseAuthMessage(&m, sizeof(m)).status().code(),
            StatusCode::kUnauthenticated);
  m = hello;
  m.version = 2;
  EXPECT_EQ(ParseAuthMessage(&m, sizeof(m)).status().code(),
            StatusCode::kFailedPrecondition);
  for (uint8_t step : {0, 6, 255}) {
    m = hello;
    m.step = step;
    EXPECT_EQ(ParseAuthMessage(&m, sizeof(m)).status().code(),
              StatusCode::kUnauthenticated)
        << int{step};
  }
}

}  // namespace
}  // namespace switchyard::transport
