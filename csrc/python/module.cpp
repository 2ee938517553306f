// curvkit._core: the one extension module. Each kernel family registers its functions from
// its own folder (csrc/<family>/bindings.cpp); adding a family adds its line below.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "core/check.h"
#include "core/runtime.h"
#include "python/interop.h"

namespace py = pybind11;

namespace curvkit {
void register_hutchinson(py::module_& m);
void register_newton_schulz(py::module_& m);
void register_inverse_root(py::module_& m);
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "curvkit native core (C++/CUDA kernels). Use the curvkit package, not this module.";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const curvkit::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const curvkit::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const curvkit::CudaError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("num_threads", &curvkit::num_threads);
  m.def("set_num_threads", &curvkit::set_num_threads, py::arg("n"));
  m.def("built_with_cuda", &curvkit::built_with_cuda);
  m.def("cuda_device_count", &curvkit::cuda_device_count);
  m.def("build_info", &curvkit::build_info);

  curvkit::interop::register_interop(m);
  curvkit::register_hutchinson(m);
  curvkit::register_newton_schulz(m);
  curvkit::register_inverse_root(m);
}
