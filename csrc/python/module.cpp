// curvkit._core: the one extension module. Each kernel family registers its functions from
// its own folder (csrc/<family>/bindings.cpp); adding a family adds its line below. Hooks that
// only the tests use go to the private submodule _core._testing.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <new>

#include "core/check.h"
#include "core/interrupt.h"
#include "core/runtime.h"
#include "python/binding.h"
#include "python/interop.h"

namespace py = pybind11;

namespace curvkit {
void register_hutchinson(py::module_& m, py::module_& testing);
void register_newton_schulz(py::module_& m, py::module_& testing);
void register_inverse_root(py::module_& m, py::module_& testing);
void register_mfac(py::module_& m, py::module_& testing);
void register_sinkhorn(py::module_& m, py::module_& testing);

namespace {

// Sets the Python error to curvkit._errors.<name> (a subclass of `fallback`), or to `fallback`
// itself while that module cannot be imported.
void set_error(const char* name, PyObject* fallback, const char* message) {
  try {
    const py::object type = py::module_::import("curvkit._errors").attr(name);
    PyErr_SetString(type.ptr(), message);
  } catch (py::error_already_set&) { PyErr_SetString(fallback, message); }
}

}  // namespace
}  // namespace curvkit

PYBIND11_MODULE(_core, m) {
  m.doc() = "curvkit native core (C++/CUDA kernels). Use the curvkit package, not this module.";
  py::module_ testing = m.def_submodule("_testing", "Hooks for curvkit's own tests; not an API.");

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const curvkit::TypeError& e) {
      curvkit::set_error("ArgumentTypeError", PyExc_TypeError, e.what());
    } catch (const curvkit::ValueError& e) {
      curvkit::set_error("ArgumentError", PyExc_ValueError, e.what());
    } catch (const curvkit::CudaError& e) {
      curvkit::set_error("CudaError", PyExc_RuntimeError, e.what());
    } catch (const curvkit::Interrupted&) { curvkit::binding::restore_interrupt(); }
  });

  m.def("num_threads", &curvkit::num_threads);
  m.def("set_num_threads", &curvkit::set_num_threads, py::arg("n"));
  m.attr("MAX_THREADS") = curvkit::kMaxThreads;
  m.def("built_with_cuda", &curvkit::built_with_cuda);
  m.def("cuda_device_count", &curvkit::cuda_device_count);
  m.def("build_info", &curvkit::build_info);

  curvkit::interop::register_interop(m, testing);
  curvkit::register_hutchinson(m, testing);
  curvkit::register_newton_schulz(m, testing);
  curvkit::register_inverse_root(m, testing);
  curvkit::register_mfac(m, testing);
  curvkit::register_sinkhorn(m, testing);
}
