// pybind11 bindings of the neuron-interpolation engine (HF cost epilogue). Buffers travel as integer addresses
// (data_ptr) plus sizes, so the module stays torch-free; pyfusion.ops.interp_cost owns and validates them.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.h"
#include "interp/interp_cost.h"

namespace py = pybind11;

namespace {

const double* cptr(uintptr_t p) { return reinterpret_cast<const double*>(p); }

}  // namespace

void bind_interp(py::module_& m) {
  m.def(
      "hf_cost",
      [](uintptr_t M, uintptr_t Q01, uintptr_t Q10, uintptr_t d0, uintptr_t e0, uintptr_t n0v, uintptr_t s0,
         uintptr_t d1, uintptr_t e1, uintptr_t n1v, uintptr_t s1, int64_t n0, int64_t n1, bool squared,
         uintptr_t out, int threads) {
        py::gil_scoped_release release;
        pyfusion::interp::hf_cost_cpu(cptr(M), cptr(Q01), cptr(Q10), cptr(d0), cptr(e0), cptr(n0v), cptr(s0),
                                      cptr(d1), cptr(e1), cptr(n1v), cptr(s1), n0, n1, squared,
                                      reinterpret_cast<double*>(out), threads);
      },
      py::arg("M"), py::arg("Q01"), py::arg("Q10"), py::arg("d0"), py::arg("e0"), py::arg("n0"), py::arg("s0"),
      py::arg("d1"), py::arg("e1"), py::arg("n1"), py::arg("s1"), py::arg("rows"), py::arg("cols"),
      py::arg("squared"), py::arg("out"), py::arg("threads") = 0,
      "HF interpolation cost (rows, cols) from Gram products; float64 contiguous buffers as integer addresses.");
#ifdef PYFUSION_HAS_CUDA
  m.def(
      "hf_cost_cuda",
      [](uintptr_t M, uintptr_t Q01, uintptr_t Q10, uintptr_t d0, uintptr_t e0, uintptr_t n0v, uintptr_t s0,
         uintptr_t d1, uintptr_t e1, uintptr_t n1v, uintptr_t s1, int64_t n0, int64_t n1, bool squared,
         uintptr_t out, uintptr_t stream) {
        py::gil_scoped_release release;
        pyfusion::interp::hf_cost_cuda(cptr(M), cptr(Q01), cptr(Q10), cptr(d0), cptr(e0), cptr(n0v), cptr(s0),
                                       cptr(d1), cptr(e1), cptr(n1v), cptr(s1), n0, n1, squared,
                                       reinterpret_cast<double*>(out), reinterpret_cast<void*>(stream));
      },
      py::arg("M"), py::arg("Q01"), py::arg("Q10"), py::arg("d0"), py::arg("e0"), py::arg("n0"), py::arg("s0"),
      py::arg("d1"), py::arg("e1"), py::arg("n1"), py::arg("s1"), py::arg("rows"), py::arg("cols"),
      py::arg("squared"), py::arg("out"), py::arg("stream"),
      "HF interpolation cost on CUDA device buffers (float64), on the given stream.");
#endif
}
