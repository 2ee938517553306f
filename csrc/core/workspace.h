// Where CUDA workspaces come from. The caller's framework owns memory (DESIGN.md): a Python
// binding installs, for the length of one call, an allocator that asks PyTorch's caching
// allocator or CuPy's pool for memory on the call's stream, and cuda::DeviceBuffer draws from
// it. With none installed (C++ callers), DeviceBuffer uses cudaMallocAsync.
#pragma once
#include <cstddef>

namespace curvkit {

class WorkspaceAllocator {
 public:
  virtual ~WorkspaceAllocator() = default;
  // Device memory of at least `bytes` (256-byte aligned), usable in the order of the call's
  // stream until release(ptr). Throws when the framework cannot allocate.
  virtual void* allocate(size_t bytes) = 0;
  virtual void release(void* ptr) noexcept = 0;
};

// The allocator installed on this thread, or nullptr.
WorkspaceAllocator* workspace_allocator();

// Installs `allocator` (may be nullptr) on this thread for the scope, then restores the previous one.
class ScopedWorkspaceAllocator {
 public:
  explicit ScopedWorkspaceAllocator(WorkspaceAllocator* allocator);
  ~ScopedWorkspaceAllocator();
  ScopedWorkspaceAllocator(const ScopedWorkspaceAllocator&) = delete;
  ScopedWorkspaceAllocator& operator=(const ScopedWorkspaceAllocator&) = delete;

 private:
  WorkspaceAllocator* previous_;
};

}  // namespace curvkit
