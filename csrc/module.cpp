// fastitm._C: the native CPU path. Ops are registered by their own translation units.
#include <pybind11/pybind11.h>

#include "fastitm.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastitm native CPU ops";
  m.def("has_openmp", []() {
#ifdef FASTITM_OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether the extension was built with OpenMP (parallel over rows).");
  m.def("abi_version", []() { return FASTITM_NATIVE_ABI; },
        "Version of the Python <-> C++ calling convention; fastitm refuses a mismatched build.");
}
