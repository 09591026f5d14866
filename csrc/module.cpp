// fastitm._C: the native CPU path. Each op lives in its own translation unit (see ops.h).
#include <pybind11/pybind11.h>

#include "fastitm.h"
#include "ops.h"

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
  // The GIL is released: the ops touch only the raw buffers handed to them.
  m.def("cross_attention_lse", &fastitm::cross_attention_lse, py::call_guard<py::gil_scoped_release>(),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("pooled"), py::arg("mask"), py::arg("B"),
        py::arg("H"), py::arg("Lq"), py::arg("Lk"), py::arg("D"), py::arg("scale"), py::arg("probs"),
        py::arg("lam"), py::arg("half"));
  m.def("cross_attention_lse_bwd", &fastitm::cross_attention_lse_bwd, py::call_guard<py::gil_scoped_release>(),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dout"), py::arg("dpooled"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"), py::arg("mask"), py::arg("B"), py::arg("H"), py::arg("Lq"), py::arg("Lk"), py::arg("D"),
        py::arg("scale"), py::arg("probs"), py::arg("lam"));
  m.def("error_reduce", &fastitm::error_reduce, py::call_guard<py::gil_scoped_release>(), py::arg("pred"),
        py::arg("target"), py::arg("R"), py::arg("Rt"), py::arg("F"), py::arg("row_target"), py::arg("row_image"),
        py::arg("row_text"), py::arg("row_timestep"), py::arg("N"), py::arg("M"), py::arg("T"), py::arg("mse"),
        py::arg("normalize"), py::arg("uncond"), py::arg("per_t"), py::arg("scores"), py::arg("row_err"), py::arg("half"));
}
