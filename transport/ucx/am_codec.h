// AmCodec: how data-plane messages travel as UCX active messages
// (docs/protocol.md, "Data plane"). Out: a Message goes as one AM, the
// 80-byte WireHeader as the AM header and the payload (the tensor, or an
// error response's text) as a separate buffer, with UCP_AM_SEND_FLAG_REPLY
// so that the receiver can answer on the same connection; payloads from
// rendezvous_threshold_bytes up are forced to rendezvous. In: the AM
// handlers hand each arrival to the Receiver as an IncomingAm, and payloads
// land in tensors from a BufferPool, rendezvous ones straight into the
// destination tensor.
//
// Thread-safety: none; the data plane's role holder (the one thread calling
// UCX at a time) makes every call, and the callbacks run on it, from
// within UCX progress. Ownership: the codec keeps a message's buffers alive
// until UCX is done with them; the worker is the caller's.
#ifndef SWITCHYARD_TRANSPORT_UCX_AM_CODEC_H_
#define SWITCHYARD_TRANSPORT_UCX_AM_CODEC_H_

#include <ucp/api/ucp.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/buffer_pool.h"
#include "common/status.h"
#include "common/tensor.h"
#include "transport/data_plane.h"
#include "transport/wire_header.h"

namespace switchyard::transport {

// Active-message ids: requests, and the responses that answer them.
constexpr unsigned kRequestAm = 1;
constexpr unsigned kResponseAm = 2;

// Installs `cb` (with `arg`) as `worker`'s handler of AM `id`, receiving
// whole messages.
Status SetAmHandler(ucp_worker_h worker, unsigned id, ucp_am_recv_callback_t cb,
                    void* arg);

// One active message as it arrived.
struct IncomingAm {
  // The header, when header_length is sizeof(WireHeader); zeros otherwise
  // (then nothing can be answered: the request id is unknown).
  WireHeader header{};
  size_t header_length = 0;
  // Eager: the payload bytes, valid during the handler only. Rendezvous:
  // UCX's descriptor, for ReceiveRendezvous or Release.
  void* data = nullptr;
  size_t length = 0;
  bool rendezvous = false;
  // Where to answer; null when the sender gave none.
  ucp_ep_h reply_ep = nullptr;

  bool header_complete() const { return header_length == sizeof(WireHeader); }
};

class AmCodec {
 public:
  struct Callbacks {
    // A request (kRequestAm) or a response (kResponseAm) arrived. Returns
    // what the UCX handler returns: UCS_INPROGRESS when it keeps a
    // rendezvous descriptor (ReceiveRendezvous or Release later), UCS_OK
    // to let UCX release the data.
    std::function<ucs_status_t(const IncomingAm&)> on_request;
    std::function<ucs_status_t(const IncomingAm&)> on_response;
    // UCX failed to send request `request_id` (with `status`).
    std::function<void(uint64_t request_id, ucs_status_t status)>
        on_send_failed;
  };

  AmCodec(size_t rendezvous_threshold_bytes, size_t pool_cached_bytes,
          Callbacks callbacks);
  ~AmCodec();
  AmCodec(const AmCodec&) = delete;
  AmCodec& operator=(const AmCodec&) = delete;

  // Installs the request and response handlers on `worker`, which every
  // later call uses.
  Status Register(ucp_worker_h worker);

  // Sends `message` over `ep` as AM `am_id`. `request_id` is the request's
  // id when it is one (a failed send then reaches on_send_failed), else 0.
  void Send(ucp_ep_h ep, unsigned am_id, Message message, uint64_t request_id);

  // A tensor for `header`'s payload (dtype, rows x cols), from the pool.
  StatusOr<Tensor> TakePayload(const WireHeader& header);
  // Receives the rendezvous payload `desc` (`bytes` long) into `into`, then
  // runs `done(into, status)`: at once when UCX finishes at once, else from
  // a later progress call.
  void ReceiveRendezvous(void* desc, Tensor into, size_t bytes,
                         std::function<void(Tensor, ucs_status_t)> done);
  // Gives a rendezvous descriptor kept by a handler back to UCX, unread.
  void Release(void* desc);

 private:
  struct SendContext;
  // UCX is done with `ctx`'s message: keeps ctx for reuse, reports a
  // failed request.
  void SendDone(SendContext* ctx, ucs_status_t status);

  const size_t rendezvous_threshold_bytes_;
  // Received payloads land in reused buffers, never fresh pages.
  const std::shared_ptr<BufferPool> pool_;
  const Callbacks callbacks_;
  ucp_worker_h worker_ = nullptr;
  // Send contexts kept for reuse (each about 200 bytes).
  std::vector<std::unique_ptr<SendContext>> idle_send_contexts_;
  // Sends UCX has not completed, as an intrusive list (no allocation per
  // send). A worker destroyed with sends in flight (a rendezvous whose
  // peer never fetched it) never calls their callbacks: the destructor
  // frees what is left (it runs after the worker is gone).
  SendContext* in_flight_ = nullptr;
};

}  // namespace switchyard::transport

#endif  // SWITCHYARD_TRANSPORT_UCX_AM_CODEC_H_
