// Reused threads for the checkpoint store's background I/O: the window a
// restore reads ahead (sst_chunk_reader) and the full buffer a checkpoint
// writes behind (direct_write_fs).
//
// std::async starts a thread per call, and on the CI VM a new thread began
// running about 1.8 ms after it was asked for (its stack's mmap and first
// page faults), longer than a 16 MiB window takes to read (1.6-2 ms): the
// read-ahead never got ahead, and a restore waited out every read. These
// threads wait for work on a condition variable instead (a wake-up costs
// tens of microseconds), and one is added only when every thread is busy,
// so a task never waits behind another.
//
// Thread-safety: thread-safe.
#ifndef SWITCHYARD_STORAGE_BACKGROUND_IO_H_
#define SWITCHYARD_STORAGE_BACKGROUND_IO_H_

#include <functional>
#include <future>
#include <memory>
#include <utility>

namespace switchyard::storage {

// Runs `task` on a background I/O thread.
void RunInBackground(std::function<void()> task);

// Runs `f` on a background I/O thread; the future holds its result. Unlike
// std::async's, the future does not wait in its destructor: wait for it
// before anything `f` uses goes away.
template <typename F>
auto InBackground(F f) -> std::future<decltype(f())> {
  using Result = decltype(f());
  auto task = std::make_shared<std::packaged_task<Result()>>(std::move(f));
  std::future<Result> result = task->get_future();
  RunInBackground([task] { (*task)(); });
  return result;
}

}  // namespace switchyard::storage

#endif  // SWITCHYARD_STORAGE_BACKGROUND_IO_H_
