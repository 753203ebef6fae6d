// pybind11 bindings of the small-batch partial_linear kernel (partial_linear.h). The Python side passes
// data pointers and sizes (torch-free); it has validated shapes, dtypes and devices before the call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "common.h"
#include "partial_linear/partial_linear.h"

namespace py = pybind11;
using pyfusion::partial_linear::Plan;

namespace {

// Below this much work (rows x stored weights) the call keeps the GIL: releasing and re-taking it costs
// ~0.2 us, about the whole kernel of a 100x100 layer at batch 1.
constexpr int64_t kReleaseGilMacs = int64_t(1) << 16;

template <typename T>
void run(const Plan& plan, uintptr_t x, int64_t rows, int64_t x_row_stride, uintptr_t ws, uintptr_t wc, uintptr_t wd,
         uintptr_t bias, uintptr_t y, int num_threads) {
  PF_CHECK(rows >= 0, "partial_linear: rows must be >= 0; got ", rows);
  if (rows > 0 && plan.o_total > 0) {
    PF_CHECK(x != 0 || plan.i_total == 0, "partial_linear: x is a null pointer");
    PF_CHECK(y != 0, "partial_linear: y is a null pointer");
  }
  auto call = [&] {
    pyfusion::partial_linear::forward<T>(plan, reinterpret_cast<const T*>(x), rows, x_row_stride,
                                         reinterpret_cast<const T*>(ws), reinterpret_cast<const T*>(wc),
                                         reinterpret_cast<const T*>(wd), reinterpret_cast<const T*>(bias),
                                         reinterpret_cast<T*>(y), num_threads);
  };
  if (rows * plan.macs_per_row >= kReleaseGilMacs) {
    py::gil_scoped_release release;
    call();
  } else {
    call();
  }
}

}  // namespace

void bind_partial_linear(py::module_& m) {
  py::class_<Plan>(m, "PartialLinearPlan",
                   "One partially fused linear layout [shared, branch_1, ..., branch_K] and activation (0 none, "
                   "1 relu, 2 gelu (erf), 3 silu), for the small-batch CPU kernel.")
      .def(py::init<const std::vector<int64_t>&, const std::vector<int64_t>&, int>(), py::arg("in_layout"),
           py::arg("out_layout"), py::arg("activation"))
      .def_readonly("i_total", &Plan::i_total)
      .def_readonly("o_total", &Plan::o_total)
      .def_readonly("macs_per_row", &Plan::macs_per_row)
      .def_readwrite("parallel_min_macs", &Plan::parallel_min_macs,
                     "OpenMP over output rows from this many multiply-adds per call (default "
                     "PARTIAL_LINEAR_PARALLEL_MIN_MACS; benchmarks lower it to measure the crossover)")
      .def("forward_f32", &run<float>, py::arg("x"), py::arg("rows"), py::arg("x_row_stride"), py::arg("w_shared"),
           py::arg("w_cross"), py::arg("w_diag"), py::arg("bias"), py::arg("y"), py::arg("num_threads"),
           "y (rows, O_total) = act(x W^T + b) from data pointers (float32); x rows of unit column stride, y "
           "contiguous, bias 0 for none. num_threads <= 0: OpenMP's default.")
      .def("forward_f64", &run<double>, py::arg("x"), py::arg("rows"), py::arg("x_row_stride"), py::arg("w_shared"),
           py::arg("w_cross"), py::arg("w_diag"), py::arg("bias"), py::arg("y"), py::arg("num_threads"),
           "forward_f32 for float64 buffers.");
  m.def("partial_linear_isa", &pyfusion::partial_linear::isa,
        "The SIMD variant of the partial_linear kernel in use: 'avx512', 'avx2' or 'default'.");
  m.def("partial_linear_set_isa", &pyfusion::partial_linear::set_isa, py::arg("name"),
        "Force a variant the CPU supports ('avx512', 'avx2', 'default'; 'auto' = the best), for tests.");
  m.attr("PARTIAL_LINEAR_PARALLEL_MIN_MACS") = pyfusion::partial_linear::kParallelMinMacs;
}
