#include "core/interrupt.h"

namespace curvkit {
namespace {

thread_local InterruptState* t_state = nullptr;
thread_local char t_marker;  // its address identifies this thread

}  // namespace

InterruptScope::InterruptScope(InterruptHook hook) : previous_(t_state) {
  state_.hook = hook;
  state_.owner = &t_marker;
  // the first poll waits one interval: a call shorter than that never runs the hook
  state_.next_poll = std::chrono::steady_clock::now() + kPollInterval;
  t_state = hook ? &state_ : previous_;
}

InterruptScope::~InterruptScope() { t_state = previous_; }

InterruptState* current_interrupt() { return t_state; }

InterruptShare::InterruptShare(InterruptState* state) : previous_(t_state) { t_state = state; }

InterruptShare::~InterruptShare() { t_state = previous_; }

bool interrupted() {
  InterruptState* s = t_state;
  if (!s) return false;
  if (s->raised.load(std::memory_order_relaxed)) return true;
  if (s->owner != &t_marker) return false;  // a worker: only the caller's thread polls
  const auto now = std::chrono::steady_clock::now();
  if (now < s->next_poll) return false;
  s->next_poll = now + kPollInterval;
  if (!s->hook()) return false;
  s->raised.store(true, std::memory_order_relaxed);
  return true;
}

void throw_if_interrupted() {
  if (interrupted()) throw Interrupted();
}

}  // namespace curvkit
