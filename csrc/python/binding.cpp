#include "python/binding.h"

namespace curvkit::binding {

ArrayList::ArrayList(const py::list& items, const char* name, StreamHandle stream, Access access, bool optional) {
  arrays_.reserve(items.size());
  for (py::handle item : items) {
    if (optional && item.is_none()) {
      arrays_.emplace_back();
      continue;
    }
    arrays_.emplace_back(access == Access::Write ? interop::import_output(item, name, stream)
                                                 : interop::import_array(item, name, stream));
  }
  for (const auto& a : arrays_) {
    pointers_.push_back(a ? &a->view : nullptr);
    if (a) views_.push_back(a->view);
  }
}

}  // namespace curvkit::binding
