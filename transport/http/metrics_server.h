// A minimal HTTP endpoint for Prometheus: GET /metrics answers the process's
// MetricsRegistry in the text exposition format; anything else is 404 (or
// 405 for other methods). One request per connection; requests are capped
// at 8 KiB and must arrive within 5 s. Runs on its own thread.
//
// Thread-safety: Start/Shutdown from the owning thread.
#ifndef SWITCHYARD_TRANSPORT_HTTP_METRICS_SERVER_H_
#define SWITCHYARD_TRANSPORT_HTTP_METRICS_SERVER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "common/status.h"

namespace switchyard::transport {

class MetricsServer {
 public:
  MetricsServer();
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Listens on "host:port" (port 0: any free port).
  Status Start(const std::string& address);
  void Shutdown();
  // "host:port" actually bound.
  std::string address() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::thread thread_;
};

}  // namespace switchyard::transport

#endif  // SWITCHYARD_TRANSPORT_HTTP_METRICS_SERVER_H_
