// pybind11 binding of the float64 A B^T kernel. Buffers travel as integer addresses (data_ptr) plus sizes and row
// strides, so the module stays torch-free; pyfusion.match.distance owns and validates them (float64, CPU, unit
// column stride).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.h"
#include "gemm/gemm.h"

namespace py = pybind11;

void bind_gemm(py::module_& m) {
  m.def("gemm_abt_f64_supported", &pyfusion::gemm::abt_f64_supported,
        "Whether this CPU runs the AVX-512 float64 A B^T kernel (csrc/gemm)");
  m.def(
      "gemm_abt_f64",
      [](uintptr_t a, uintptr_t b, uintptr_t c, int64_t m_, int64_t n, int64_t k, int64_t lda, int64_t ldb,
         int64_t ldc, int threads, uintptr_t sq_a, uintptr_t sq_b) {
        PF_CHECK(pyfusion::gemm::abt_f64_supported(), "gemm_abt_f64: this CPU has no AVX-512F");
        PF_CHECK(m_ >= 0 && n >= 0 && k >= 0, "gemm_abt_f64: bad sizes (", m_, ", ", n, ", ", k, ")");
        PF_CHECK(lda >= k && ldb >= k && ldc >= n, "gemm_abt_f64: row strides (", lda, ", ", ldb, ", ", ldc,
                 ") below the row lengths (", k, ", ", k, ", ", n, ")");
        py::gil_scoped_release release;
        pyfusion::gemm::abt_f64(reinterpret_cast<const double*>(a), reinterpret_cast<const double*>(b),
                                reinterpret_cast<double*>(c), m_, n, k, lda, ldb, ldc, threads,
                                reinterpret_cast<double*>(sq_a), reinterpret_cast<double*>(sq_b));
      },
      py::arg("a"), py::arg("b"), py::arg("c"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("lda"),
      py::arg("ldb"), py::arg("ldc"), py::arg("threads") = 1, py::arg("sq_a") = 0, py::arg("sq_b") = 0,
      "c (m, n) = a (m, k) b (n, k)^T, float64, given as integer addresses and row strides (unit column strides); "
      "sq_a (m) / sq_b (n), unless 0, get the rows' sums of squares");
}
