// The data-plane message header (docs/protocol.md, "Data plane").
//
// Every data-plane message is this fixed, versioned header plus an optional
// payload sent as a separate buffer: a tensor (dtype, rows x cols, row-major)
// or, for error responses, the error text. The header carries the routing
// epoch so that a worker refuses requests from an older epoch.
#ifndef SWITCHYARD_TRANSPORT_WIRE_HEADER_H_
#define SWITCHYARD_TRANSPORT_WIRE_HEADER_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/status.h"
#include "common/tensor.h"

namespace switchyard::transport {

constexpr uint32_t kWireMagic = 0x31445953;  // "SYD1" little-endian.
constexpr uint16_t kWireVersion = 1;

enum class MessageKind : uint8_t {
  kExpertForward = 1,    // x (T, d) -> y (T, d)
  kExpertBackward = 2,   // dy (T, d) -> dx (T, d)
  kStepDone = 3,         // no payload -> no payload
  kDensePull = 4,        // no payload -> parameters (1, n)
  kDensePush = 5,        // gradients (1, n) -> no payload
  kEcho = 6,             // any tensor -> the same tensor (tests, benchmarks)
  kExpertEval = 7,       // x (T, d) -> y (T, d), nothing kept (validation)
  kCheckpointFetch = 8,  // no payload -> tensor micro_batch of a shard's
                         // checkpoint at step, as (1, n)
  kShardHandover = 9,    // no payload -> tensor micro_batch of a shard this
                         // worker handed over at step in a live move of
                         // epoch (RoutingEntry.moved_from), as (1, n)
  kProbe = 10,           // no payload -> no payload, answered by the thread
                         // that serves requests: alive beyond the
                         // connection (a sender whose request went
                         // unanswered asks before blaming the peer)
  // Hot-expert replication, primary -> the worker hosting a copy
  // (expert_worker/replica_host.h): the shard's weights for `step`
  // ((1, n) fp32) -> no payload; a chunk's forward x -> y and backward
  // dy -> dx (trainer_rank: the chunk); the chunk's weight-gradient share
  // of the step: no payload -> (1, n) fp32; drop the copy (the shard
  // cooled, or its chunks went elsewhere): no payload -> no payload.
  kReplicaWeights = 11,
  kReplicaForward = 12,
  kReplicaBackward = 13,
  kReplicaShare = 14,
  kReplicaDrop = 15,
  kMaxKind = 15,
};

// dtype 0 means no tensor payload (an error response carries text).
constexpr uint8_t kNoDType = 0;

struct WireHeader {
  uint32_t magic = kWireMagic;
  uint16_t version = kWireVersion;
  uint8_t kind = 0;   // MessageKind
  uint8_t dtype = 0;  // DType, or kNoDType
  uint64_t request_id = 0;
  uint64_t epoch = 0;
  int64_t step = 0;
  int32_t micro_batch = 0;
  int32_t layer = 0;   // MoE-layer ordinal (expert messages).
  int32_t expert = 0;  // -1 for dense-table messages.
  int32_t shard = 0;   // Expert shard, or dense shard index.
  int32_t trainer_rank = 0;
  int32_t status_code = 0;  // Responses: a StatusCode; 0 is OK.
  int64_t rows = 0;
  int64_t cols = 0;
  uint64_t payload_bytes = 0;
};
static_assert(sizeof(WireHeader) == 80, "the wire header is 80 bytes");

// Checks what the transport alone can check: magic, version, kind, dtype,
// shape, and that payload_bytes matches the shape (or, for an error
// response, that there is text) and what actually arrived.
Status ValidateHeader(const WireHeader& header, size_t received_header_bytes,
                      size_t received_payload_bytes, size_t max_payload_bytes);

// "forward step 3 mb 0 L1.E5.S0 rank 2 epoch 7".
std::string DescribeHeader(const WireHeader& header);

}  // namespace switchyard::transport

#endif  // SWITCHYARD_TRANSPORT_WIRE_HEADER_H_
