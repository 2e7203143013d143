// Fetching and printing the coordinator's cluster status.
#ifndef SWITCHYARD_CLI_STATUS_CLIENT_H_
#define SWITCHYARD_CLI_STATUS_CLIENT_H_

#include <chrono>
#include <string>

#include "common/net_address.h"
#include "common/status.h"
#include "control.pb.h"

namespace switchyard::cli {

// One authenticated request to the coordinator, connection and answer
// within `timeout`.
StatusOr<control::Envelope> CallCoordinator(const HostPort& coordinator,
                                            const std::string& secret,
                                            std::chrono::milliseconds timeout,
                                            control::Envelope request);

// One authenticated StatusRequest, connection and answer within `timeout`.
StatusOr<control::StatusResponse> FetchStatus(
    const HostPort& coordinator, const std::string& secret,
    std::chrono::milliseconds timeout);

// Human-readable tables: epoch and placement summary, workers, trainers.
std::string FormatStatus(const control::StatusResponse& status);

// JSON (protobuf's mapping); the per-shard routing entries only when asked.
std::string StatusJson(control::StatusResponse status, bool include_routing);

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_STATUS_CLIENT_H_
