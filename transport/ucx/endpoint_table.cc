#include "transport/ucx/endpoint_table.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "transport/control/auth.h"
#include "transport/ucx/am_codec.h"
#include "transport/ucx/ucx_status.h"

namespace switchyard::transport {
namespace {

using Clock = std::chrono::steady_clock;

StatusOr<sockaddr_storage> ResolveAddress(const std::string& host_port,
                                          socklen_t* len) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos) {
    return InvalidArgumentError("data-plane address '" + host_port +
                                "' is not host:port");
  }
  const std::string host = host_port.substr(0, colon);
  const std::string port = host_port.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* result = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &result) != 0 ||
      result == nullptr) {
    return InvalidArgumentError("cannot resolve data-plane address '" +
                                host_port + "'");
  }
  sockaddr_storage storage{};
  std::memcpy(&storage, result->ai_addr, result->ai_addrlen);
  *len = result->ai_addrlen;
  freeaddrinfo(result);
  return storage;
}

std::string SockaddrString(const sockaddr_storage& ss) {
  char host[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (ss.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    port = ntohs(in->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    port = ntohs(in6->sin6_port);
  }
  return std::string(host) + ":" + std::to_string(port);
}

// "am=posix/memory rma_bw=cma/memory ...": the transports of `ep`'s lanes
// and what each carries, from ucp_ep_print_info's lane lines
// ("lane[1]:  3:posix/memory.0 md[2] -> ... am am_bw#0 keepalive").
std::string DescribeLanes(ucp_ep_h ep) {
  char* text = nullptr;
  size_t size = 0;
  FILE* out = ::open_memstream(&text, &size);
  if (out == nullptr) return "?";
  ucp_ep_print_info(ep, out);
  std::fclose(out);
  std::string described;
  std::istringstream lines(std::string(text, size));
  std::free(text);
  for (std::string line; std::getline(lines, line);) {
    const size_t lane = line.find("lane[");
    const size_t arrow = line.find("->");
    if (lane == std::string::npos || arrow == std::string::npos) continue;
    // The transport: "posix/memory" from " 3:posix/memory.0 md[2]".
    std::istringstream local(line.substr(line.find(':', lane) + 1));
    std::string resource;
    local >> resource;
    resource = resource.substr(resource.find(':') + 1);
    resource = resource.substr(0, resource.rfind('.'));
    // Its uses: the words after the remote md/transport/sysdev field.
    std::istringstream uses(line.substr(arrow + 2));
    std::string word;
    uses >> word;  // md[2]/posix/sysdev[255]
    while (uses >> word) {
      if (word == "am" || word.rfind("rma_bw", 0) == 0 ||
          word.rfind("am_bw", 0) == 0) {
        word = word.substr(0, word.find('#'));
        described += (described.empty() ? "" : " ") + word + "=" + resource;
      }
    }
  }
  return described.empty() ? "?" : described;
}

// Starts a forced close of `ep`; the request to wait on, or null.
void* ForceClose(ucp_ep_h ep) {
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  void* req = ucp_ep_close_nbx(ep, &param);
  return UCS_PTR_IS_PTR(req) ? req : nullptr;
}

}  // namespace

EndpointTable::EndpointTable(std::string secret,
                             std::chrono::milliseconds handshake_timeout,
                             Callbacks callbacks)
    : secret_(std::move(secret)),
      handshake_timeout_(handshake_timeout),
      callbacks_(std::move(callbacks)) {}

Status EndpointTable::Listen(ucp_worker_h worker, const std::string& host,
                             std::string* address) {
  worker_ = worker;
  auto on_auth = [](void* arg, const void* header, size_t header_length, void*,
                    size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<EndpointTable*>(arg);
    const bool has_ep = param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP;
    if (!has_ep) return UCS_OK;  // Nothing to answer or drop.
    if (length != 0) {
      self->Refuse(param->reply_ep, "a handshake message with a payload");
      return UCS_OK;
    }
    self->OnAuthMessage(param->reply_ep, header, header_length);
    return UCS_OK;
  };
  RETURN_IF_ERROR(SetAmHandler(worker_, kAuthAm, on_auth, this));
  socklen_t len = 0;
  ASSIGN_OR_RETURN(sockaddr_storage listen_addr,
                   ResolveAddress(host + ":0", &len));
  ucp_listener_params_t params{};
  params.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR |
                      UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&listen_addr);
  params.sockaddr.addrlen = len;
  params.conn_handler.arg = this;
  params.conn_handler.cb = [](ucp_conn_request_h request, void* arg) {
    static_cast<EndpointTable*>(arg)->Accept(request);
  };
  RETURN_IF_ERROR(UCX_STATUS(ucp_listener_create(worker_, &params, &listener_),
                             "ucp_listener_create"));
  ucp_listener_attr_t attr{};
  attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  RETURN_IF_ERROR(
      UCX_STATUS(ucp_listener_query(listener_, &attr), "ucp_listener_query"));
  const std::string bound = SockaddrString(attr.sockaddr);
  *address = host + bound.substr(bound.rfind(':'));
  return OkStatus();
}

void EndpointTable::Accept(ucp_conn_request_h request) {
  ucp_conn_request_attr_t attr{};
  attr.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
  std::string peer = "?";
  if (ucp_conn_request_query(request, &attr) == UCS_OK) {
    peer = SockaddrString(attr.client_address);
  }
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST;
  params.conn_request = request;
  SetPeerErrorHandling(&params);
  ucp_ep_h ep = nullptr;
  const ucs_status_t s = ucp_ep_create(worker_, &params, &ep);
  if (s != UCS_OK) {
    LOG(WARNING) << "data plane: cannot accept " << peer << ": "
                 << ucs_status_string(s);
    return;
  }
  Info& info = eps_[ep];
  info.peer = peer;
  info.client_side = false;
  info.auth = Auth::kServerAwaitsHello;
  info.handshake_deadline = Clock::now() + handshake_timeout_;
}

void EndpointTable::SetPeerErrorHandling(ucp_ep_params_t* params) {
  params->field_mask |=
      UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params->err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params->err_handler.arg = this;
  params->err_handler.cb = [](void* arg, ucp_ep_h ep, ucs_status_t s) {
    static_cast<EndpointTable*>(arg)->Drop(
        ep, UCX_STATUS(s, "data-plane peer lost"));
  };
}

StatusOr<ucp_ep_h> EndpointTable::Connect(const std::string& peer) {
  auto it = client_eps_.find(peer);
  if (it != client_eps_.end()) return it->second;
  socklen_t len = 0;
  ASSIGN_OR_RETURN(sockaddr_storage addr, ResolveAddress(peer, &len));
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR;
  params.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  params.sockaddr.addrlen = len;
  SetPeerErrorHandling(&params);
  ucp_ep_h ep = nullptr;
  RETURN_IF_ERROR(UCX_STATUS(ucp_ep_create(worker_, &params, &ep),
                             "connect to data plane at " + peer));
  client_eps_[peer] = ep;
  Info& info = eps_[ep];
  info.peer = peer;
  info.client_side = true;
  info.auth = Auth::kClientWiringUp;
  info.handshake_deadline = Clock::now() + handshake_timeout_;
  struct FlushContext {
    EndpointTable* self;
    ucp_ep_h ep;
  };
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.user_data = new FlushContext{this, ep};
  param.cb.send = [](void* request, ucs_status_t status, void* user_data) {
    auto* c = static_cast<FlushContext*>(user_data);
    // Handled outside UCX's callback, as a posted command.
    EndpointTable* self = c->self;
    ucp_ep_h flushed = c->ep;
    self->callbacks_.post(
        [self, flushed, status] { self->WiredUp(flushed, status); });
    delete c;
    ucp_request_free(request);
  };
  ucs_status_ptr_t flush = ucp_ep_flush_nbx(ep, &param);
  if (!UCS_PTR_IS_PTR(flush)) {
    delete static_cast<FlushContext*>(param.user_data);
    WiredUp(ep, UCS_PTR_STATUS(flush));
  }
  return ep;
}

EndpointTable::State EndpointTable::state(ucp_ep_h ep) const {
  auto it = eps_.find(ep);
  if (it == eps_.end()) return State::kGone;
  return it->second.auth == Auth::kDone ? State::kReady : State::kConnecting;
}

void EndpointTable::Park(ucp_ep_h ep, std::function<void()> send) {
  auto it = eps_.find(ep);
  CHECK(it != eps_.end() && it->second.client_side &&
        it->second.auth != Auth::kDone)
      << "Park needs a connecting client endpoint";
  it->second.parked.push_back(std::move(send));
}

std::string EndpointTable::PeerOf(ucp_ep_h ep) const {
  auto it = ep != nullptr ? eps_.find(ep) : eps_.end();
  return it == eps_.end() ? "?" : it->second.peer;
}

bool EndpointTable::HasServerSide() const {
  for (const auto& [ep, info] : eps_) {
    if (!info.client_side) return true;
  }
  return false;
}

std::string EndpointTable::ConnectionInfo(const std::string& peer) const {
  MutexLock lock(&lanes_mu_);
  auto it = lanes_.find(peer);
  return it == lanes_.end() ? "" : it->second;
}

void EndpointTable::WiredUp(ucp_ep_h ep, ucs_status_t status) {
  auto it = eps_.find(ep);
  if (it == eps_.end()) return;  // Dropped meanwhile; its requests failed.
  if (status != UCS_OK) {
    Drop(ep, UCX_STATUS(status, "connect to data plane at " + it->second.peer));
    return;
  }
  Info& info = it->second;
  info.own_nonce = control::RandomNonce();
  info.auth = Auth::kClientAwaitsChallenge;
  SendAuth(ep, MakeAuthMessage(AuthStep::kHello, info.own_nonce));
}

void EndpointTable::OnAuthMessage(ucp_ep_h ep, const void* bytes,
                                  size_t length) {
  auto it = eps_.find(ep);
  if (it == eps_.end()) return;  // Dropped already.
  Info& info = it->second;
  StatusOr<AuthMessage> message = ParseAuthMessage(bytes, length);
  if (!message.ok()) {
    if (info.client_side) {
      Drop(ep, message.status().WithContext("data-plane handshake with " +
                                            info.peer));
    } else {
      Refuse(ep, message.status().message());
    }
    return;
  }
  if (info.client_side) {
    ClientStep(ep, info, *message);
  } else {
    ServerStep(ep, info, *message);
  }
}

void EndpointTable::ServerStep(ucp_ep_h ep, Info& info,
                               const AuthMessage& message) {
  if (info.auth == Auth::kServerAwaitsHello &&
      message.auth_step() == AuthStep::kHello) {
    info.peer_nonce = message.nonce_bytes();
    info.own_nonce = control::RandomNonce();
    info.auth = Auth::kServerAwaitsProof;
    SendAuth(ep, MakeAuthMessage(AuthStep::kChallenge, info.own_nonce,
                                 DataServerProof(secret_, info.own_nonce,
                                                 info.peer_nonce)));
    return;
  }
  if (info.auth == Auth::kServerAwaitsProof &&
      message.auth_step() == AuthStep::kProof) {
    if (!control::ProofsEqual(
            message.proof_bytes(),
            DataClientProof(secret_, info.own_nonce, info.peer_nonce))) {
      LOG(WARNING) << "data plane: " << info.peer
                   << " failed authentication (wrong cluster secret?); "
                      "closing the connection";
      info.handshake_deadline = Clock::time_point::max();
      SendAuth(ep, MakeAuthMessage(AuthStep::kRefused),
               UnauthenticatedError("data-plane authentication failed"));
      return;
    }
    info.auth = Auth::kDone;
    VLOG(1) << "data plane: " << info.peer << " authenticated";
    SendAuth(ep, MakeAuthMessage(AuthStep::kAccepted));
    return;
  }
  Refuse(ep, "an out-of-order handshake message");
}

void EndpointTable::ClientStep(ucp_ep_h ep, Info& info,
                               const AuthMessage& message) {
  if (message.auth_step() == AuthStep::kRefused) {
    Drop(ep, UnauthenticatedError(
                 "data plane at " + info.peer +
                 " refused this process's proof of the cluster secret (the "
                 "two hold different secrets?)"));
    return;
  }
  if (info.auth == Auth::kClientAwaitsChallenge &&
      message.auth_step() == AuthStep::kChallenge) {
    info.peer_nonce = message.nonce_bytes();
    if (!control::ProofsEqual(
            message.proof_bytes(),
            DataServerProof(secret_, info.peer_nonce, info.own_nonce))) {
      Drop(ep, UnauthenticatedError(
                   "data plane at " + info.peer +
                   " failed to prove it holds this process's cluster secret "
                   "(the two hold different secrets?)"));
      return;
    }
    info.auth = Auth::kClientAwaitsVerdict;
    SendAuth(ep, MakeAuthMessage(AuthStep::kProof, {},
                                 DataClientProof(secret_, info.peer_nonce,
                                                 info.own_nonce)));
    return;
  }
  if (info.auth == Auth::kClientAwaitsVerdict &&
      message.auth_step() == AuthStep::kAccepted) {
    FinishClientHandshake(ep, info);
    return;
  }
  Drop(ep, UnauthenticatedError("data plane at " + info.peer +
                                " broke the handshake protocol"));
}

void EndpointTable::FinishClientHandshake(ucp_ep_h ep, Info& info) {
  info.auth = Auth::kDone;
  const std::string lanes = DescribeLanes(ep);
  LOG(INFO) << "data plane: connected to " << info.peer << " over " << lanes;
  {
    MutexLock lock(&lanes_mu_);
    lanes_[info.peer] = lanes;
  }
  std::vector<std::function<void()>> parked = std::move(info.parked);
  for (auto& send : parked) send();
}

void EndpointTable::SendAuth(ucp_ep_h ep, const AuthMessage& message,
                             const Status& drop_after_send) {
  struct Context {
    EndpointTable* self;
    ucp_ep_h ep;
    AuthMessage message;
    Status drop_after_send;
  };
  auto* ctx = new Context{this, ep, message, drop_after_send};
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK |
                       UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER;
  param.user_data = ctx;
  param.cb.send = [](void* request, ucs_status_t, void* user_data) {
    auto* c = static_cast<Context*>(user_data);
    if (!c->drop_after_send.ok()) {
      EndpointTable* self = c->self;
      ucp_ep_h ep = c->ep;
      Status why = c->drop_after_send;
      self->callbacks_.post([self, ep, why] { self->Drop(ep, why); });
    }
    delete c;
    ucp_request_free(request);
  };
  ucs_status_ptr_t req = ucp_am_send_nbx(
      ep, kAuthAm, &ctx->message, sizeof(AuthMessage), nullptr, 0, &param);
  if (UCS_PTR_IS_PTR(req)) return;
  // Done (or failed) at once.
  const Status drop = ctx->drop_after_send;
  delete ctx;
  if (req != nullptr) {
    Drop(ep, UCX_STATUS(UCS_PTR_STATUS(req), "data-plane handshake send"));
  } else if (!drop.ok()) {
    Drop(ep, drop);
  }
}

void EndpointTable::Refuse(ucp_ep_h ep, const std::string& what) {
  auto it = eps_.find(ep);
  if (it == eps_.end()) return;
  LOG(WARNING) << "data plane: dropping unauthenticated peer "
               << it->second.peer << ": it sent " << what;
  Drop(ep, UnauthenticatedError("peer sent " + what));
}

bool EndpointTable::ExpireHandshakes(Clock::time_point now) {
  std::vector<std::pair<ucp_ep_h, std::string>> expired;
  for (const auto& [ep, info] : eps_) {
    if (info.auth != Auth::kDone && info.handshake_deadline <= now) {
      expired.emplace_back(ep, info.peer);
    }
  }
  for (const auto& [ep, peer] : expired) {
    LOG(WARNING) << "data plane: handshake with " << peer
                 << " not completed within " << handshake_timeout_.count()
                 << " ms; closing the connection";
    Drop(ep, DeadlineExceededError("data-plane handshake with " + peer +
                                   " not completed within " +
                                   std::to_string(handshake_timeout_.count()) +
                                   " ms"));
  }
  return !expired.empty();
}

Clock::time_point EndpointTable::NextHandshakeDeadline() const {
  Clock::time_point next = Clock::time_point::max();
  for (const auto& [ep, info] : eps_) {
    if (info.auth != Auth::kDone)
      next = std::min(next, info.handshake_deadline);
  }
  return next;
}

void EndpointTable::Drop(ucp_ep_h ep, const Status& why) {
  auto it = eps_.find(ep);
  if (it == eps_.end()) return;
  const Info info = std::move(it->second);
  eps_.erase(it);
  if (info.client_side) {
    client_eps_.erase(info.peer);
    MutexLock lock(&lanes_mu_);
    lanes_.erase(info.peer);  // ConnectionInfo: no connection now.
  }
  callbacks_.lost(ep, info.peer, why);
  // Close outside the error callback.
  callbacks_.post([ep] {
    if (void* req = ForceClose(ep)) ucp_request_free(req);
  });
}

void EndpointTable::Close() {
  std::vector<void*> closing;
  for (auto& [ep, info] : eps_) {
    if (void* req = ForceClose(ep)) closing.push_back(req);
  }
  eps_.clear();
  client_eps_.clear();
  // Bounded: never block shutdown on the network.
  const auto limit = Clock::now() + std::chrono::milliseconds(500);
  for (void* req : closing) {
    while (ucp_request_check_status(req) == UCS_INPROGRESS &&
           Clock::now() < limit) {
      ucp_worker_progress(worker_);
    }
    ucp_request_free(req);
  }
  if (listener_ != nullptr) ucp_listener_destroy(listener_);
  listener_ = nullptr;
}

}  // namespace switchyard::transport
