// pybind11 binding of the feature gather. Buffers travel as integer addresses (data_ptr) plus sizes, so the module
// stays torch-free; pyfusion.match.align owns and validates them (float64 / int64, contiguous, CPU).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.h"
#include "gather/gather.h"

namespace py = pybind11;

void bind_gather(py::module_& m) {
  m.def(
      "gather_axis1_f64",
      [](uintptr_t src, int64_t outer, int64_t n_axis, int64_t inner, uintptr_t index, int64_t n_index,
         uintptr_t out, uintptr_t sq, int threads) {
        py::gil_scoped_release release;
        pyfusion::gather::gather_axis1_f64(reinterpret_cast<const double*>(src), outer, n_axis, inner,
                                           reinterpret_cast<const int64_t*>(index), n_index,
                                           reinterpret_cast<double*>(out), reinterpret_cast<double*>(sq), threads);
      },
      py::arg("src"), py::arg("outer"), py::arg("n_axis"), py::arg("inner"), py::arg("index"), py::arg("n_index"),
      py::arg("out"), py::arg("sq") = 0, py::arg("threads") = 1,
      "out (outer, n_index, inner) = src (outer, n_axis, inner)[:, index, :], float64 / int64 index, given as "
      "integer addresses (contiguous); sq (outer), unless 0, gets each out row's sum of squares (fixed lane order)");
  m.attr("gather_sum_lanes") = pyfusion::gather::kLanes;
}
