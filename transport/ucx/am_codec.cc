#include "transport/ucx/am_codec.h"

#include <cstring>
#include <utility>

#include "transport/ucx/ucx_status.h"

namespace switchyard::transport {
namespace {

// Send contexts kept for reuse.
constexpr size_t kIdleSendContexts = 1024;

}  // namespace

// Keeps a message's buffers alive until UCX is done sending it.
struct AmCodec::SendContext {
  AmCodec* self = nullptr;
  WireHeader header;
  Tensor payload;
  std::string text;
  // A request's id (its send failing fails it); 0 for a response.
  uint64_t request_id = 0;
  // Neighbours in AmCodec::in_flight_ while UCX holds the send.
  SendContext* prev = nullptr;
  SendContext* next = nullptr;
};

AmCodec::AmCodec(size_t rendezvous_threshold_bytes, size_t pool_cached_bytes,
                 Callbacks callbacks)
    : rendezvous_threshold_bytes_(rendezvous_threshold_bytes),
      pool_(BufferPool::Create(pool_cached_bytes)),
      callbacks_(std::move(callbacks)) {}

AmCodec::~AmCodec() {
  while (in_flight_ != nullptr) {
    SendContext* next = in_flight_->next;
    delete in_flight_;
    in_flight_ = next;
  }
}

Status SetAmHandler(ucp_worker_h worker, unsigned id, ucp_am_recv_callback_t cb,
                    void* arg) {
  ucp_am_handler_param_t am{};
  am.field_mask =
      UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
      UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  am.id = id;
  am.flags = UCP_AM_FLAG_WHOLE_MSG;
  am.arg = arg;
  am.cb = cb;
  return UCX_STATUS(
      ucp_worker_set_am_recv_handler(worker, &am),
      "ucp_worker_set_am_recv_handler (AM " + std::to_string(id) + ")");
}

Status AmCodec::Register(ucp_worker_h worker) {
  worker_ = worker;
  for (unsigned id : {kRequestAm, kResponseAm}) {
    auto* arg = const_cast<std::function<ucs_status_t(const IncomingAm&)>*>(
        id == kRequestAm ? &callbacks_.on_request : &callbacks_.on_response);
    auto cb = [](void* arg, const void* header, size_t header_length,
                 void* data, size_t length, const ucp_am_recv_param_t* param) {
      IncomingAm in;
      in.header_length = header_length;
      if (header_length == sizeof(WireHeader)) {
        std::memcpy(&in.header, header, sizeof(WireHeader));
      }
      in.data = data;
      in.length = length;
      in.rendezvous = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
      if (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) {
        in.reply_ep = param->reply_ep;
      }
      return (*static_cast<std::function<ucs_status_t(const IncomingAm&)>*>(
          arg))(in);
    };
    RETURN_IF_ERROR(SetAmHandler(worker_, id, cb, arg));
  }
  return OkStatus();
}

void AmCodec::Send(ucp_ep_h ep, unsigned am_id, Message message,
                   uint64_t request_id) {
  SendContext* ctx = nullptr;
  if (idle_send_contexts_.empty()) {
    ctx = new SendContext;
    ctx->self = this;
  } else {
    ctx = idle_send_contexts_.back().release();
    idle_send_contexts_.pop_back();
  }
  ctx->prev = nullptr;
  ctx->next = in_flight_;
  if (in_flight_ != nullptr) in_flight_->prev = ctx;
  in_flight_ = ctx;
  ctx->header = message.header;
  ctx->payload = std::move(message.payload);
  ctx->text = std::move(message.error_text);
  ctx->request_id = request_id;
  const void* buffer = nullptr;
  size_t bytes = 0;
  if (!ctx->payload.empty()) {
    buffer = ctx->payload.data();
    bytes = ctx->payload.num_bytes();
  } else if (!ctx->text.empty()) {
    buffer = ctx->text.data();
    bytes = ctx->text.size();
  }
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK |
                       UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_AM_SEND_FLAG_REPLY;
  if (bytes >= rendezvous_threshold_bytes_) {
    param.flags |= UCP_AM_SEND_FLAG_RNDV;
  }
  param.user_data = ctx;
  param.cb.send = [](void* request, ucs_status_t status, void* user_data) {
    auto* c = static_cast<SendContext*>(user_data);
    c->self->SendDone(c, status);
    ucp_request_free(request);
  };
  ucs_status_ptr_t req = ucp_am_send_nbx(
      ep, am_id, &ctx->header, sizeof(WireHeader), buffer, bytes, &param);
  if (req == nullptr || UCS_PTR_IS_ERR(req)) SendDone(ctx, UCS_PTR_STATUS(req));
}

void AmCodec::SendDone(SendContext* ctx, ucs_status_t status) {
  (ctx->prev != nullptr ? ctx->prev->next : in_flight_) = ctx->next;
  if (ctx->next != nullptr) ctx->next->prev = ctx->prev;
  const uint64_t request_id = ctx->request_id;
  ctx->payload = Tensor();
  ctx->text.clear();
  if (idle_send_contexts_.size() < kIdleSendContexts) {
    idle_send_contexts_.emplace_back(ctx);
  } else {
    delete ctx;
  }
  if (status != UCS_OK && request_id != 0) {
    callbacks_.on_send_failed(request_id, status);
  }
}

StatusOr<Tensor> AmCodec::TakePayload(const WireHeader& header) {
  return pool_->Take(static_cast<DType>(header.dtype),
                     {header.rows, header.cols});
}

void AmCodec::ReceiveRendezvous(
    void* desc, Tensor into, size_t bytes,
    std::function<void(Tensor, ucs_status_t)> done) {
  struct RecvContext {
    Tensor into;
    std::function<void(Tensor, ucs_status_t)> done;
  };
  auto* ctx = new RecvContext{std::move(into), std::move(done)};
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.user_data = ctx;
  param.cb.recv_am = [](void* request, ucs_status_t status, size_t,
                        void* user_data) {
    auto* c = static_cast<RecvContext*>(user_data);
    c->done(std::move(c->into), status);
    delete c;
    ucp_request_free(request);
  };
  ucs_status_ptr_t req =
      ucp_am_recv_data_nbx(worker_, desc, ctx->into.data(), bytes, &param);
  if (req == nullptr || UCS_PTR_IS_ERR(req)) {
    ctx->done(std::move(ctx->into), UCS_PTR_STATUS(req));
    delete ctx;
  }
}

void AmCodec::Release(void* desc) { ucp_am_data_release(worker_, desc); }

}  // namespace switchyard::transport
