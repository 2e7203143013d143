// PendingRequests: the requests a data plane has sent and not yet seen
// answered, each with the callback that its answer (or failure) completes,
// and their deadlines in a min-heap. Pure bookkeeping: no UCX, no clock
// reads, no threads (tests/transport/pending_requests_test.cc).
//
// Ids: a request's id is (sequence << 32) | slot, never 0 and never reused,
// so that a late answer to an expired request finds nothing, even once a
// newer request occupies its slot. Slots are reused, so that a warm table
// allocates nothing per request.
//
// Deadlines: answering a request does not search the heap; its entry stays
// until it surfaces (then skipped), or until Add finds the heap mostly stale
// and keeps only the live entries.
//
// Thread-safety: none; the owner serialises every call (the UCX data plane:
// its role holder). Each callback runs on the calling thread after its
// request has left the table, so it may add or complete requests.
// Ownership: the table owns each callback until it runs it (exactly once).
#ifndef SWITCHYARD_TRANSPORT_UCX_PENDING_REQUESTS_H_
#define SWITCHYARD_TRANSPORT_UCX_PENDING_REQUESTS_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "transport/data_plane.h"

namespace switchyard::transport {

class PendingRequests {
 public:
  using Clock = std::chrono::steady_clock;

  PendingRequests() = default;
  PendingRequests(const PendingRequests&) = delete;
  PendingRequests& operator=(const PendingRequests&) = delete;

  // Registers a request to `peer`, sent over `channel` (an opaque key, the
  // connection: see IdsOn), that `done` completes; returns its id (not 0).
  // `receive_into` is the request's Message::receive_into (TakeReceiveInto).
  uint64_t Add(ResponseCallback done, Clock::time_point deadline,
               const void* channel, const std::string& peer,
               Tensor receive_into = Tensor());

  // Requests pending.
  size_t size() const { return slots_.size() - free_slots_.size(); }
  // The peer of pending request `id`; null when it is not pending (answered,
  // expired, failed, or never issued). Valid until the table next changes.
  const std::string* Find(uint64_t id) const;
  // The channel pending request `id` went out on; null when it is not
  // pending.
  const void* ChannelOf(uint64_t id) const;
  // Pending request `id`'s receive_into, handed over once (empty after,
  // and when it had none or is not pending).
  Tensor TakeReceiveInto(uint64_t id);

  // Completes pending request `id` with `result`: takes it out of the
  // table, then runs its callback. False (and nothing runs) when `id` is not
  // pending.
  bool Complete(uint64_t id, StatusOr<Message> result);

  // Completes, earliest deadline first, every request whose deadline is at
  // or before `now` with DEADLINE_EXCEEDED; returns how many. The peers
  // they went to are appended to *peers (when not null), each once.
  size_t ExpireDue(Clock::time_point now,
                   std::vector<std::string>* peers = nullptr);

  // The earliest deadline in the heap, or Clock::time_point::max() when it
  // is empty. NOTE: may be an answered request's (entries go lazily): a
  // sleeper bounded by it may wake early, never late.
  Clock::time_point NextDeadline() const;

  // The pending requests sent over `channel`, in slot order.
  std::vector<uint64_t> IdsOn(const void* channel) const;

  // Completes every pending request with `why` (in slot order) and forgets
  // every deadline; returns how many.
  size_t FailAll(const Status& why);

  // Entries in the deadline heap, stale ones included (bounded by about
  // twice the pending requests plus 64).
  size_t deadline_entries() const { return deadlines_.size(); }

 private:
  struct Slot {
    uint64_t id = 0;  // 0: free.
    ResponseCallback done;
    const void* channel = nullptr;
    std::string peer;
    Tensor receive_into;
  };
  using Deadline = std::pair<Clock::time_point, uint64_t>;

  const Slot* FindSlot(uint64_t id) const;
  // Keeps only the live requests' deadline entries.
  void DropStaleDeadlines();

  std::vector<Slot> slots_;
  std::vector<uint32_t> free_slots_;
  // Min-heap of (deadline, id) under std::greater.
  std::vector<Deadline> deadlines_;
  uint64_t next_sequence_ = 1;
};

}  // namespace switchyard::transport

#endif  // SWITCHYARD_TRANSPORT_UCX_PENDING_REQUESTS_H_
