#include "transport/data_plane.h"

#include <condition_variable>
#include <future>
#include <mutex>

namespace switchyard::transport {

Message ErrorResponse(const WireHeader& request, const Status& status) {
  Message m;
  m.header = request;
  m.header.status_code =
      static_cast<int32_t>(status.ok() ? StatusCode::kInternal : status.code());
  m.header.dtype = kNoDType;
  m.header.rows = m.header.cols = 0;
  m.error_text = status.message();
  m.header.payload_bytes = m.error_text.size();
  return m;
}

Message TensorMessage(const WireHeader& header, Tensor payload) {
  Message m;
  m.header = header;
  m.header.status_code = 0;
  if (payload.empty()) {
    m.header.dtype = kNoDType;
    m.header.rows = m.header.cols = 0;
    m.header.payload_bytes = 0;
  } else {
    m.header.dtype = static_cast<uint8_t>(payload.dtype());
    m.header.rows = payload.rank() == 2 ? payload.dim(0) : 1;
    m.header.cols =
        payload.rank() == 2 ? payload.dim(1) : payload.num_elements();
    m.header.payload_bytes = payload.num_bytes();
  }
  m.payload = std::move(payload);
  return m;
}

StatusOr<std::vector<Tensor>> SendAll(DataPlane* data_plane,
                                      std::vector<Outgoing> requests,
                                      std::chrono::milliseconds timeout) {
  struct Pending {
    std::mutex mu;
    std::condition_variable cv;
    size_t outstanding = 0;
    std::vector<Tensor> replies;
    Status error;
  };
  auto pending = std::make_shared<Pending>();
  pending->outstanding = requests.size();
  pending->replies.resize(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    data_plane->Send(
        requests[i].peer, std::move(requests[i].message), timeout,
        [pending, i, label = requests[i].label](StatusOr<Message> r) {
          std::lock_guard<std::mutex> lock(pending->mu);
          if (!r.ok()) {
            if (pending->error.ok())
              pending->error = r.status().WithContext(label);
          } else {
            Tensor t = std::move(r->payload);
            pending->replies[i] = t.empty() || t.dtype() == DType::kF32
                                      ? std::move(t)
                                      : t.To(DType::kF32);
          }
          if (--pending->outstanding == 0) pending->cv.notify_all();
        });
  }
  std::unique_lock<std::mutex> lock(pending->mu);
  // Each callback runs by its request's deadline; the margin covers
  // scheduling only.
  if (!pending->cv.wait_for(lock, timeout + std::chrono::seconds(5),
                            [&] { return pending->outstanding == 0; })) {
    return DeadlineExceededError(std::to_string(pending->outstanding) +
                                 " data-plane requests not answered");
  }
  if (!pending->error.ok()) return pending->error;
  return std::move(pending->replies);
}

StatusOr<Message> DataPlane::SendSync(const std::string& peer, Message request,
                                      std::chrono::milliseconds timeout) {
  auto promise = std::make_shared<std::promise<StatusOr<Message>>>();
  auto future = promise->get_future();
  Send(peer, std::move(request), timeout,
       [promise](StatusOr<Message> r) { promise->set_value(std::move(r)); });
  return future.get();  // Send guarantees the callback by the deadline.
}

}  // namespace switchyard::transport
