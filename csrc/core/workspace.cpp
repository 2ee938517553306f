#include "core/workspace.h"

namespace curvkit {
namespace {
thread_local WorkspaceAllocator* installed = nullptr;
}  // namespace

WorkspaceAllocator* workspace_allocator() { return installed; }

ScopedWorkspaceAllocator::ScopedWorkspaceAllocator(WorkspaceAllocator* allocator) : previous_(installed) {
  installed = allocator;
}

ScopedWorkspaceAllocator::~ScopedWorkspaceAllocator() { installed = previous_; }

}  // namespace curvkit
