// pybind11 binding of the dense scatter engine. Buffers travel as integer addresses (data_ptr) plus sizes, so the
// module stays torch-free; pyfusion.fuse.builder owns and validates them (float64 / int64, contiguous, CPU).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"
#include "scatter/scatter.h"

namespace py = pybind11;

void bind_scatter(py::module_& m) {
  m.def(
      "scatter_dense_f64",
      [](const std::vector<std::tuple<uintptr_t, int64_t, int64_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int,
                                      double, bool>>& members,
         int64_t N0, int64_t N1, int64_t taps, uintptr_t out, int threads) {
        std::vector<pyfusion::scatter::Member> ms;
        ms.reserve(members.size());
        for (const auto& t : members) {
          ms.push_back({reinterpret_cast<const double*>(std::get<0>(t)), std::get<1>(t), std::get<2>(t),
                        reinterpret_cast<const int64_t*>(std::get<3>(t)),
                        reinterpret_cast<const int64_t*>(std::get<4>(t)),
                        reinterpret_cast<const double*>(std::get<5>(t)),
                        reinterpret_cast<const double*>(std::get<6>(t)), std::get<7>(t), std::get<8>(t),
                        std::get<9>(t)});
        }
        py::gil_scoped_release release;
        pyfusion::scatter::scatter_dense_f64(ms, N0, N1, taps, reinterpret_cast<double*>(out), threads);
      },
      py::arg("members"), py::arg("rows"), py::arg("cols"), py::arg("taps"), py::arg("out"), py::arg("threads") = 1,
      "Dense fused tensor (rows, cols, taps) from members (src, n0, n1, dest0, dest1, v0, v1, v_first, lam, "
      "scale_lam) given as integer addresses (0: no factor); bit-equal to the builder's torch scatter.");
}
