#include "transport/ucx/pending_requests.h"

#include <algorithm>
#include <functional>
#include <utility>

namespace switchyard::transport {
namespace {

constexpr uint64_t kSlotMask = 0xffffffffu;

}  // namespace

uint64_t PendingRequests::Add(ResponseCallback done, Clock::time_point deadline,
                              const void* channel, const std::string& peer,
                              Tensor receive_into) {
  if (free_slots_.empty()) {
    free_slots_.push_back(static_cast<uint32_t>(slots_.size()));
    slots_.emplace_back();
  }
  const uint32_t slot = free_slots_.back();
  free_slots_.pop_back();
  const uint64_t id = (next_sequence_++ << 32) | slot;
  Slot& s = slots_[slot];
  s.id = id;
  s.done = std::move(done);
  s.channel = channel;
  s.peer = peer;  // Assigned: the slot's string keeps its capacity.
  s.receive_into = std::move(receive_into);
  if (deadlines_.size() >= 2 * size() + 64) DropStaleDeadlines();
  deadlines_.emplace_back(deadline, id);
  std::push_heap(deadlines_.begin(), deadlines_.end(), std::greater<>());
  return id;
}

const PendingRequests::Slot* PendingRequests::FindSlot(uint64_t id) const {
  const uint64_t slot = id & kSlotMask;
  if (id == 0 || slot >= slots_.size() || slots_[slot].id != id) {
    return nullptr;
  }
  return &slots_[slot];
}

const std::string* PendingRequests::Find(uint64_t id) const {
  const Slot* s = FindSlot(id);
  return s == nullptr ? nullptr : &s->peer;
}

const void* PendingRequests::ChannelOf(uint64_t id) const {
  const Slot* slot = FindSlot(id);
  return slot == nullptr ? nullptr : slot->channel;
}

Tensor PendingRequests::TakeReceiveInto(uint64_t id) {
  if (FindSlot(id) == nullptr) return Tensor();
  return std::exchange(slots_[id & kSlotMask].receive_into, Tensor());
}

bool PendingRequests::Complete(uint64_t id, StatusOr<Message> result) {
  if (FindSlot(id) == nullptr) return false;
  Slot& s = slots_[id & kSlotMask];
  ResponseCallback done = std::move(s.done);
  s.id = 0;
  s.done = nullptr;
  s.channel = nullptr;
  s.receive_into = Tensor();
  free_slots_.push_back(static_cast<uint32_t>(id & kSlotMask));
  done(std::move(result));
  return true;
}

size_t PendingRequests::ExpireDue(Clock::time_point now,
                                  std::vector<std::string>* peers) {
  size_t expired = 0;
  // The heap is read afresh each time: a callback may add requests.
  while (!deadlines_.empty() && deadlines_.front().first <= now) {
    std::pop_heap(deadlines_.begin(), deadlines_.end(), std::greater<>());
    const uint64_t id = deadlines_.back().second;
    deadlines_.pop_back();
    const std::string* peer = Find(id);
    if (peer == nullptr) continue;  // Answered before its deadline.
    if (peers != nullptr &&
        std::find(peers->begin(), peers->end(), *peer) == peers->end()) {
      peers->push_back(*peer);
    }
    Complete(id, DeadlineExceededError("no data-plane response from " + *peer +
                                       " by the deadline"));
    ++expired;
  }
  return expired;
}

PendingRequests::Clock::time_point PendingRequests::NextDeadline() const {
  return deadlines_.empty() ? Clock::time_point::max()
                            : deadlines_.front().first;
}

std::vector<uint64_t> PendingRequests::IdsOn(const void* channel) const {
  std::vector<uint64_t> ids;
  for (const Slot& s : slots_) {
    if (s.id != 0 && s.channel == channel) ids.push_back(s.id);
  }
  return ids;
}

size_t PendingRequests::FailAll(const Status& why) {
  std::vector<uint64_t> ids;
  for (const Slot& s : slots_) {
    if (s.id != 0) ids.push_back(s.id);
  }
  size_t failed = 0;
  for (uint64_t id : ids) failed += Complete(id, why) ? 1 : 0;
  deadlines_.clear();
  return failed;
}

void PendingRequests::DropStaleDeadlines() {
  std::vector<Deadline> live;
  for (const Deadline& entry : deadlines_) {
    if (FindSlot(entry.second) != nullptr) live.push_back(entry);
  }
  deadlines_.swap(live);
  std::make_heap(deadlines_.begin(), deadlines_.end(), std::greater<>());
}

}  // namespace switchyard::transport
