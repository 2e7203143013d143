#include "transport/data_plane.h"

#include <future>

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

StatusOr<Message> DataPlane::SendSync(const std::string& peer, Message request,
                                      std::chrono::milliseconds timeout) {
  auto promise = std::make_shared<std::promise<StatusOr<Message>>>();
  auto future = promise->get_future();
  Send(peer, std::move(request), timeout,
       [promise](StatusOr<Message> r) { promise->set_value(std::move(r)); });
  return future.get();  // Send guarantees the callback by the deadline.
}

}  // namespace switchyard::transport
