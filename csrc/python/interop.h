// The one intake path from Python arrays to ArrayView, zero-copy:
//   1. __dlpack__ (versioned capsule first, then the legacy one), passing the CUDA stream
//      the kernel will run on so the producer orders its pending work before ours;
//   2. the buffer protocol (NumPy arrays DLPack refuses, e.g. read-only ones on old NumPy);
//   0. a DLPack capsule itself, exported on the caller's current stream by the Python layer
//      (curvkit._arrays.exported: lists of torch tensors, whose __dlpack__ costs 6 us each).
// Strides are kept as they are (negative and zero included); kernels that need a layout
// check it and the Python layer copies explicitly (curvkit._arrays.contiguous).
#pragma once
#include <pybind11/pybind11.h>

#include <memory>
#include <optional>
#include <vector>

#include "core/array.h"
#include "core/workspace.h"
#include "python/dlpack.h"

namespace curvkit::interop {

namespace py = pybind11;

// Owns what keeps an imported array alive (a DLPack tensor or a Py_buffer). Destroy it
// with the GIL held; bindings do, since they release the GIL only around compute.
struct ImportedArray {
  // Calls the DLPack deleter or releases the Py_buffer.
  struct Owner {
    dlpack::DLManagedTensor* legacy = nullptr;
    dlpack::DLManagedTensorVersioned* versioned = nullptr;
    Py_buffer buffer{};
    bool has_buffer = false;
    Owner() = default;
    Owner(const Owner&) = delete;
    Owner& operator=(const Owner&) = delete;
    ~Owner();
  };

  ArrayView view;
  std::string path;  // "dlpack_versioned", "dlpack", "torch" (a CPU tensor, torch's exporter) or "buffer"
  std::unique_ptr<Owner> owner;
};

// `name` is the argument name used in error messages; `stream` is the CUDA stream the
// caller will run on (ignored for CPU arrays).
ImportedArray import_array(py::handle obj, const char* name, StreamHandle stream = 0);

// Same, then requires a writable array.
ImportedArray import_output(py::handle obj, const char* name, StreamHandle stream = 0);

// The workspace allocator of one binding call: device memory from the caller's framework
// through `allocate(nbytes) -> (array, device pointer)` (curvkit._arrays.workspace_allocator),
// installed on this thread while the object lives; None installs nothing. Create and destroy
// it with the GIL held.
//
// The framework's blocks ("chunks", 1 MiB at least) are kept for the call and carved into
// workspaces, each chunk a stack: a released workspace is reused once all that was carved
// after it from its chunk is released too (kernels scope their buffers, so that is the usual
// order). The GIL, which the bindings have released, is taken only for a new chunk; when no
// chunk has room, the empty ones go back first, so that a call holds about its peak of live
// workspaces. A framework error (out of memory) propagates as the framework's own exception.
class FrameworkWorkspace final : public WorkspaceAllocator {
 public:
  explicit FrameworkWorkspace(py::object allocate);
  void* allocate(size_t bytes) override;
  void release(void* ptr) noexcept override;

 private:
  struct Block {
    size_t begin, end;
    bool released;
  };
  struct Chunk {
    py::object owner;  // the framework's array
    char* base;
    size_t size;
    std::vector<Block> blocks;  // in the order carved
    size_t used() const { return blocks.empty() ? 0 : blocks.back().end; }
  };
  static constexpr size_t kMinChunk = size_t(1) << 20, kAlignment = 256;

  py::object allocate_;
  std::vector<Chunk> chunks_;
  ScopedWorkspaceAllocator scope_;  // last: uninstalled before the chunks go back
};

void register_interop(py::module_& m, py::module_& testing);

}  // namespace curvkit::interop
