// Clang's thread-safety annotations (-Wthread-safety), the macro set abseil
// and LLVM use: a member GUARDED_BY a Mutex may only be touched with it
// held, a function that REQUIRES one may only be called with it held, and
// clang checks both at compile time (`make thread-safety`). Other compilers
// see nothing. Use them with switchyard::Mutex (common/mutex.h): libstdc++'s
// std::mutex carries no capability attribute, so clang cannot check it.
#pragma once

#if defined(__clang__)
#define SY_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define SY_THREAD_ANNOTATION(x)
#endif

// A type that is a lock (Mutex).
#define CAPABILITY(x) SY_THREAD_ANNOTATION(capability(x))
// An RAII type that holds a lock for its lifetime (MutexLock).
#define SCOPED_CAPABILITY SY_THREAD_ANNOTATION(scoped_lockable)
// The member is read and written only with `x` held.
#define GUARDED_BY(x) SY_THREAD_ANNOTATION(guarded_by(x))
// What the pointer points to is read and written only with `x` held.
#define PT_GUARDED_BY(x) SY_THREAD_ANNOTATION(pt_guarded_by(x))
// Lock order: this lock is taken only after (or before) the named ones.
#define ACQUIRED_AFTER(...) SY_THREAD_ANNOTATION(acquired_after(__VA_ARGS__))
#define ACQUIRED_BEFORE(...) SY_THREAD_ANNOTATION(acquired_before(__VA_ARGS__))
// The caller holds the locks (exclusively, or at least shared).
#define REQUIRES(...) SY_THREAD_ANNOTATION(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) \
  SY_THREAD_ANNOTATION(requires_shared_capability(__VA_ARGS__))
// The function takes (or releases) the locks and returns holding (or not
// holding) them.
#define ACQUIRE(...) SY_THREAD_ANNOTATION(acquire_capability(__VA_ARGS__))
#define ACQUIRE_SHARED(...) \
  SY_THREAD_ANNOTATION(acquire_shared_capability(__VA_ARGS__))
#define RELEASE(...) SY_THREAD_ANNOTATION(release_capability(__VA_ARGS__))
#define RELEASE_SHARED(...) \
  SY_THREAD_ANNOTATION(release_shared_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) \
  SY_THREAD_ANNOTATION(try_acquire_capability(__VA_ARGS__))
// The caller must not hold the locks (the function takes them itself).
#define EXCLUDES(...) SY_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
// Tells the analysis that the lock is held here (checked at run time by
// the callee, if at all).
#define ASSERT_CAPABILITY(x) SY_THREAD_ANNOTATION(assert_capability(x))
// The function returns a reference to the lock `x`.
#define RETURN_CAPABILITY(x) SY_THREAD_ANNOTATION(lock_returned(x))
// Opts a function out of the analysis; every use says why.
#define NO_THREAD_SAFETY_ANALYSIS \
  SY_THREAD_ANNOTATION(no_thread_safety_analysis)
