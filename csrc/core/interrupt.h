// Stopping a long call when its caller asks (Ctrl-C in Python): the binding installs a hook on
// the calling thread (binding::CallScope), and kernels poll interrupted() between iterations.
// Without a hook (the C++ API on its own, tests/cpp) nothing is ever interrupted.
//
// Polling is safe anywhere, on any thread: only the thread that installed the hook (OpenMP's
// thread 0 when it runs a parallel region) calls it, at most every kPollInterval; other threads
// share the caller's state through InterruptShare and read its flag. A kernel that sees
// interrupted() stops iterating and finishes its matrix (the outputs are then unspecified);
// throw_if_interrupted() turns the flag into an Interrupted exception, only outside parallel
// regions (run_matrix_tasks does it after each region and each large task).
#pragma once
#include <atomic>
#include <chrono>
#include <exception>

namespace curvkit {

// Thrown by throw_if_interrupted(); csrc/python/module.cpp turns it into the Python exception
// the hook saw (KeyboardInterrupt for Ctrl-C).
struct Interrupted : std::exception {
  const char* what() const noexcept override { return "interrupted"; }
};

// True when the call should stop (Python: a signal handler raised). Called with no lock held.
using InterruptHook = bool (*)();

// One call's interrupt state; lives on the calling thread's stack (InterruptScope).
struct InterruptState {
  InterruptHook hook = nullptr;
  const void* owner = nullptr;  // the installing thread's marker (interrupt.cpp)
  std::chrono::steady_clock::time_point next_poll{};
  std::atomic<bool> raised{false};
};

// Installs `hook` for calls made on this thread while the scope lives (nested scopes restore).
class InterruptScope {
 public:
  explicit InterruptScope(InterruptHook hook);
  ~InterruptScope();
  InterruptScope(const InterruptScope&) = delete;
  InterruptScope& operator=(const InterruptScope&) = delete;

 private:
  InterruptState state_;
  InterruptState* previous_;
};

// This thread's current state (null without a hook); pass it to InterruptShare in workers.
InterruptState* current_interrupt();

// Makes a worker thread see the caller's state for the scope's life (state may be null).
class InterruptShare {
 public:
  explicit InterruptShare(InterruptState* state);
  ~InterruptShare();
  InterruptShare(const InterruptShare&) = delete;
  InterruptShare& operator=(const InterruptShare&) = delete;

 private:
  InterruptState* previous_;
};

// Whether the current call was asked to stop; polls the hook when on the caller's thread and
// kPollInterval has passed since the last poll (so short calls never take the GIL).
bool interrupted();

// Throws Interrupted when interrupted(). Never call it inside an OpenMP parallel region.
void throw_if_interrupted();

constexpr std::chrono::milliseconds kPollInterval{20};

}  // namespace curvkit
