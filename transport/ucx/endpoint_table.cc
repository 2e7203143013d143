#include "transport/ucx/endpoint_table.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

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

EndpointTable::EndpointTable(Callbacks callbacks)
    : callbacks_(std::move(callbacks)) {}

Status EndpointTable::Listen(ucp_worker_h worker, const std::string& host,
                             std::string* address) {
  worker_ = worker;
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
  eps_[ep] = Info{peer, /*client_side=*/false, /*ready=*/true, {}};
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
  eps_[ep] = Info{peer, /*client_side=*/true, /*ready=*/false, {}};
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
  return it->second.ready ? State::kReady : State::kConnecting;
}

void EndpointTable::Park(ucp_ep_h ep, std::function<void()> send) {
  auto it = eps_.find(ep);
  CHECK(it != eps_.end() && !it->second.ready) << "Park needs kConnecting";
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
  it->second.ready = true;
  const std::string lanes = DescribeLanes(ep);
  LOG(INFO) << "data plane: connected to " << it->second.peer << " over "
            << lanes;
  {
    MutexLock lock(&lanes_mu_);
    lanes_[it->second.peer] = lanes;
  }
  std::vector<std::function<void()>> parked = std::move(it->second.parked);
  for (auto& send : parked) send();
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
