// A data-plane request and the callback that answers it, as the worker's
// queues, its step gate and its checkpoint-fetch server hold them. Every
// Task is answered exactly once: served, refused, or (at shutdown) told
// the worker is going away.
#ifndef SWITCHYARD_EXPERT_WORKER_WORKER_TASK_H_
#define SWITCHYARD_EXPERT_WORKER_WORKER_TASK_H_

#include <string>
#include <vector>

#include "common/status.h"
#include "transport/data_plane.h"

namespace switchyard::expert_worker {

struct Task {
  transport::Message request;
  transport::Reply reply;
};

// Answers each of `tasks` with UNAVAILABLE "`name` is shutting down".
inline void AnswerShuttingDown(std::vector<Task> tasks,
                               const std::string& name) {
  for (Task& t : tasks) {
    t.reply(transport::ErrorResponse(
        t.request.header, UnavailableError(name + " is shutting down")));
  }
}

}  // namespace switchyard::expert_worker

#endif  // SWITCHYARD_EXPERT_WORKER_WORKER_TASK_H_
