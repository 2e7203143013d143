#include "cli/status_client.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <boost/asio.hpp>
#include <cstdio>
#include <ctime>
#include <sstream>
#include <thread>

#include "coordinator/placement.h"
#include "transport/control/client.h"

namespace switchyard::cli {

StatusOr<control::Envelope> CallCoordinator(const HostPort& coordinator,
                                            const std::string& secret,
                                            std::chrono::milliseconds timeout,
                                            control::Envelope request) {
  boost::asio::io_context io;
  auto work = boost::asio::make_work_guard(io);
  control::ClientOptions options;
  options.server = coordinator;
  options.control.secret = secret;
  options.control.handshake_timeout = timeout;
  auto client = control::ControlClient::Create(io, options, nullptr, nullptr);
  std::thread io_thread([&io] { io.run(); });
  client->Start();
  StatusOr<control::Envelope> response = UnavailableError("not connected");
  Status connected = client->WaitConnected(timeout);
  if (connected.ok()) {
    response = client->CallSync(std::move(request), timeout);
  } else {
    response = connected;
  }
  client->Shutdown();
  work.reset();
  io.stop();
  io_thread.join();
  return response;
}

StatusOr<control::StatusResponse> FetchStatus(
    const HostPort& coordinator, const std::string& secret,
    std::chrono::milliseconds timeout) {
  control::Envelope request;
  request.mutable_status_request();
  auto response =
      CallCoordinator(coordinator, secret, timeout, std::move(request));
  if (!response.ok()) return response.status();
  if (response->body_case() != control::Envelope::kStatusResponse) {
    return InternalError("coordinator answered a status request with body " +
                         std::to_string(response->body_case()));
  }
  return response->status_response();
}

namespace {

std::string StateName(control::MemberState state) {
  switch (state) {
    case control::ALIVE:
      return "ALIVE";
    case control::UNCONFIRMED:
      return "UNCONFIRMED";
    case control::DEAD:
      return "DEAD";
    case control::LEFT:
      return "LEFT";
    default:
      return "?";
  }
}

}  // namespace

std::string FormatStatus(const control::StatusResponse& status) {
  using coordinator::FormatBytes;
  std::ostringstream out;
  out << "epoch " << status.epoch() << "   placement: ";
  if (!status.placed()) {
    out << "waiting for workers to register";
  } else {
    out << status.placed_shards() << "/" << status.total_shards()
        << " shards placed, " << FormatBytes(status.total_shard_bytes())
        << " in all";
  }
  out << "\n";
  if (!status.placement_error().empty()) {
    out << "placement error: " << status.placement_error() << "\n";
  }
  if (!status.pending_move().empty()) {
    out << "move pending for " << status.pending_move_ms()
        << " ms (the trainers stop at the next step boundary): "
        << status.pending_move() << "\n";
  }
  out << "checkpoints: ";
  if (status.checkpoints_size() == 0) out << "none committed";
  for (int i = 0; i < status.checkpoints_size(); ++i) {
    const auto& c = status.checkpoints(i);
    out << (i > 0 ? ", " : "") << "step " << c.step() << " (" << c.shards()
        << " shards, " << FormatBytes(c.bytes()) << ")";
  }
  if (status.routing().resume_step() > 0) {
    out << "; resumed from step " << status.routing().resume_step();
  }
  out << "\n";
  if (status.recoveries_total() > 0) {
    out << "recoveries: " << status.recoveries_total()
        << " in all; the last:\n";
    const int n = status.recoveries_size();
    for (int i = std::max(0, n - 3); i < n; ++i) {
      const auto& r = status.recoveries(i);
      const std::time_t when = static_cast<std::time_t>(r.unix_ms() / 1000);
      char stamp[32];
      std::tm tm{};
      ::localtime_r(&when, &tm);
      std::strftime(stamp, sizeof(stamp), "%H:%M:%S", &tm);
      out << "  " << stamp << " epoch " << r.epoch() << ": at step "
          << r.at_step()
          << (r.rolled_back() ? ", rolled back to step "
                              : ", continued from step ")
          << r.resume_step()
          << (r.rolled_back() ? "" : " (nothing rolled back)") << ", "
          << (r.duration_ms() > 0 ? "training again after " +
                                        std::to_string(r.duration_ms()) + " ms"
                                  : std::string("in progress"))
          << "; cause: " << r.cause() << "\n";
    }
  }
  char line[256];
  std::snprintf(line, sizeof(line),
                "\n%-12s %-11s %-22s %-8s %-8s %7s %12s %12s %10s %10s\n",
                "WORKER", "STATE", "ADDRESS", "PID", "DEVICE", "SHARDS",
                "BYTES", "CAPACITY", "HEARTBEAT", "TOKENS");
  out << line;
  for (const auto& m : status.members()) {
    if (m.kind() != control::WORKER) continue;
    // The data-plane address once the worker serves one, else its host.
    const std::string& address =
        m.data_address().empty() ? m.host() : m.data_address();
    std::snprintf(line, sizeof(line),
                  "%-12s %-11s %-22s %-8d %-8s %7d %12s %12s %7lld ms %10llu\n",
                  m.name().c_str(),
                  m.draining() ? "DRAINING" : StateName(m.state()).c_str(),
                  address.c_str(), m.pid(), m.device().c_str(), m.shards(),
                  FormatBytes(m.shard_bytes()).c_str(),
                  FormatBytes(m.capacity_bytes()).c_str(),
                  static_cast<long long>(m.ms_since_heartbeat()),
                  static_cast<unsigned long long>(m.tokens()));
    out << line;
  }
  // How evenly the experts' work falls on the workers: the rows each
  // computed (its shards' tokens, less those copies elsewhere computed,
  // plus those it computed as a copy).
  uint64_t max_tokens = 0, sum_tokens = 0;
  int holders = 0;
  bool copies = false;
  for (const auto& m : status.members()) {
    if (m.kind() != control::WORKER) continue;
    const uint64_t own =
        m.tokens() - std::min(m.tokens(), m.offloaded_tokens());
    const uint64_t work = own + m.copy_tokens();
    copies = copies || m.copy_tokens() > 0 || m.offloaded_tokens() > 0;
    if (m.shards() == 0 && work == 0) continue;
    ++holders;
    sum_tokens += work;
    max_tokens = std::max<uint64_t>(max_tokens, work);
  }
  if (sum_tokens > 0) {
    std::snprintf(line, sizeof(line),
                  "token load per worker (tokens between its last two "
                  "heartbeats%s): max/mean %.2f\n",
                  copies ? ", with the rows copies computed" : "",
                  static_cast<double>(max_tokens) * holders / sum_tokens);
    out << line;
  }
  for (const auto& m : status.members()) {
    for (const auto& r : m.replicated()) {
      const auto& ref = r.shard();
      out << "hot expert shard L" << ref.layer() << ".E" << ref.expert() << ".S"
          << ref.shard() << " on " << m.name() << ": " << r.replicas()
          << " replicas (" << r.tokens() << " tokens)\n";
    }
    if (m.copy_tokens() > 0 || m.offloaded_tokens() > 0 || m.copy_bytes() > 0) {
      out << m.name() << " computed " << m.copy_tokens()
          << " rows for other workers' shards and had " << m.offloaded_tokens()
          << " of its own computed elsewhere; its copies hold "
          << FormatBytes(m.copy_bytes()) << "\n";
    }
  }
  for (const auto& m : status.members()) {
    if (m.probation_ms_left() > 0) {
      out << m.name() << " is in a crash loop: no shards for another "
          << (m.probation_ms_left() + 999) / 1000
          << " s (cluster.probation_ms)\n";
    }
  }
  std::snprintf(line, sizeof(line), "\n%-12s %-11s %-8s %-6s %10s\n", "TRAINER",
                "STATE", "PID", "RANK", "HEARTBEAT");
  out << line;
  for (const auto& m : status.members()) {
    if (m.kind() != control::TRAINER) continue;
    std::snprintf(line, sizeof(line), "%-12s %-11s %-8d %-6d %7lld ms\n",
                  m.name().c_str(), StateName(m.state()).c_str(), m.pid(),
                  m.rank(), static_cast<long long>(m.ms_since_heartbeat()));
    out << line;
  }
  return out.str();
}

std::string StatusJson(control::StatusResponse status, bool include_routing) {
  if (!include_routing) status.mutable_routing()->clear_entries();
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string json;
  (void)google::protobuf::util::MessageToJsonString(status, &json, options);
  return json;
}

}  // namespace switchyard::cli
