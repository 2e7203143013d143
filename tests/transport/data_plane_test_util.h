// Helpers shared by the data-plane tests (data_plane_contract_test.cc,
// ucx_data_plane_test.cc, data_plane_processes_test.cc): an echo server's
// handler, echo requests with distinct contents, and a fixture that starts
// an echo server and a client of one backend. The tests live in this
// namespace too (each in an anonymous one inside it).
#ifndef SWITCHYARD_TESTS_TRANSPORT_DATA_PLANE_TEST_UTIL_H_
#define SWITCHYARD_TESTS_TRANSPORT_DATA_PLANE_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "tests/testing/data_plane_options.h"
#include "transport/data_plane.h"

namespace switchyard::transport::data_plane_testing {

using Ms = std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

// Echo handler: kEcho returns the payload; step 999 is never answered
// (a silent server); step -1 answers with NOT_FOUND.
RequestHandler EchoHandler(std::vector<Reply>* held, std::mutex* mu);

// A kEcho request at `step` of fp32 (rows, cols) whose contents depend on
// `seed`.
Message EchoRequest(int64_t rows, int64_t cols, uint32_t seed,
                    int64_t step = 0);

// Whether the two payloads hold the same bytes.
bool SamePayload(const Message& a, const Message& b);

// Every data-plane backend built.
enum class Backend { kUcx, kInProcess };

std::string BackendName(const ::testing::TestParamInfo<Backend>& info);

// A server (an echo handler, see EchoHandler) and a client of backend().
class DataPlanePairTest : public ::testing::Test {
 protected:
  virtual Backend backend() const = 0;
  void SetUp() override;
  void TearDown() override;
  virtual DataPlaneOptions ServerOptions() {
    return testing::TestDataPlaneOptions();
  }

  // `threads` threads each send `per_thread` echoes with SendSync, request
  // `i` of thread `t` being make(t, i); how many came back intact.
  int EchoFromThreads(int threads, int per_thread,
                      const std::function<Message(int, int)>& make);

  // The client's peer-lost reports, as (peer, code), once `want` have come
  // or after 5 s.
  std::vector<std::pair<std::string, StatusCode>> LostReports(size_t want);

  std::unique_ptr<DataPlane> server_, client_;
  std::vector<Reply> held_;  // GUARDED_BY(held_mu_)
  std::mutex held_mu_;
  std::vector<std::pair<std::string, StatusCode>>
      lost_;  // GUARDED_BY(lost_mu_)
  std::mutex lost_mu_;
};

}  // namespace switchyard::transport::data_plane_testing

#endif  // SWITCHYARD_TESTS_TRANSPORT_DATA_PLANE_TEST_UTIL_H_
