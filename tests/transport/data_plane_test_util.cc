// The helpers of data_plane_test_util.h.
#include "tests/transport/data_plane_test_util.h"

#include <atomic>
#include <cstring>
#include <thread>
#include <utility>

#include "tests/testing/data_plane_options.h"
#include "transport/local/in_process_data_plane.h"

namespace switchyard::transport::data_plane_testing {
namespace {

std::unique_ptr<DataPlane> NewDataPlane(Backend backend,
                                        const DataPlaneOptions& options) {
  if (backend == Backend::kInProcess) return NewInProcessDataPlane();
  return NewUcxDataPlane(options).value();
}

}  // namespace

RequestHandler EchoHandler(std::vector<Reply>* held, std::mutex* mu) {
  return [held, mu](Message request, Reply reply) {
    if (request.header.step == 999) {
      std::lock_guard<std::mutex> lock(*mu);
      held->push_back(std::move(reply));
      return;
    }
    if (request.header.step == -1) {
      reply(ErrorResponse(request.header,
                          NotFoundError("unknown shard L9.E9.S9")));
      return;
    }
    reply(TensorResponse(request.header, std::move(request.payload)));
  };
}

Message EchoRequest(int64_t rows, int64_t cols, uint32_t seed, int64_t step) {
  Message m;
  m.header.kind = static_cast<uint8_t>(MessageKind::kEcho);
  m.header.step = step;
  m.payload = Tensor::Zeros(DType::kF32, {rows, cols}).value();
  uint32_t* words = static_cast<uint32_t*>(m.payload.data());
  for (int64_t i = 0; i < rows * cols; ++i) {
    words[i] = seed * 2654435761u + static_cast<uint32_t>(i);
  }
  m.header.dtype = static_cast<uint8_t>(DType::kF32);
  m.header.rows = rows;
  m.header.cols = cols;
  m.header.payload_bytes = m.payload.num_bytes();
  return m;
}

bool SamePayload(const Message& a, const Message& b) {
  return a.payload.num_bytes() == b.payload.num_bytes() &&
         std::memcmp(a.payload.data(), b.payload.data(),
                     a.payload.num_bytes()) == 0;
}

std::string BackendName(const ::testing::TestParamInfo<Backend>& info) {
  return info.param == Backend::kUcx ? "Ucx" : "InProcess";
}

void DataPlanePairTest::SetUp() {
  server_ = NewDataPlane(backend(), ServerOptions());
  ASSERT_TRUE(server_->Start(EchoHandler(&held_, &held_mu_)).ok());
  client_ = NewDataPlane(backend(), testing::TestDataPlaneOptions());
  client_->set_peer_lost_handler(
      [this](const std::string& peer, const Status& why) {
        std::lock_guard<std::mutex> lock(lost_mu_);
        lost_.emplace_back(peer, why.code());
      });
  ASSERT_TRUE(client_->Start(nullptr).ok());
}

std::vector<std::pair<std::string, StatusCode>> DataPlanePairTest::LostReports(
    size_t want) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (true) {
    {
      std::lock_guard<std::mutex> lock(lost_mu_);
      if (lost_.size() >= want || std::chrono::steady_clock::now() >= until) {
        return lost_;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

void DataPlanePairTest::TearDown() {
  client_->Shutdown();
  server_->Shutdown();
}

int DataPlanePairTest::EchoFromThreads(
    int threads, int per_thread, const std::function<Message(int, int)>& make) {
  std::atomic<int> ok{0};
  std::vector<std::thread> running;
  for (int t = 0; t < threads; ++t) {
    running.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        Message request = make(t, i);
        Message copy;
        copy.payload = request.payload.Clone();
        auto r = client_->SendSync(server_->address(), std::move(request),
                                   Ms(30000));
        if (r.ok() && SamePayload(*r, copy)) ++ok;
      }
    });
  }
  for (auto& t : running) t.join();
  return ok.load();
}

}  // namespace switchyard::transport::data_plane_testing
