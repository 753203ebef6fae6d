// pybind11 bindings of the assignment engine: numpy buffers in, numpy buffers out, GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "assignment/lsap.h"
#include "common.h"

namespace py = pybind11;
using pyfusion::lsap::Options;
using pyfusion::lsap::Problem;

namespace {

template <typename T>
py::tuple solve_typed(const py::list& costs, const std::vector<int64_t>& num_matches, bool maximize,
                      std::optional<double> unmatched_cost, int num_threads) {
  using Arr = py::array_t<T, py::array::c_style>;
  const int64_t B = static_cast<int64_t>(costs.size());
  PF_CHECK(static_cast<int64_t>(num_matches.size()) == B, "num_matches must have one entry per problem (", B,
           "); got ", num_matches.size());
  std::vector<Arr> keep;  // holds references while the GIL is released
  std::vector<Problem> problems(B);
  int64_t max_n = 0;
  for (int64_t b = 0; b < B; ++b) {
    py::handle h = costs[b];
    PF_CHECK(py::isinstance<Arr>(h), "cost[", b, "] must be a C-contiguous ", sizeof(T) == 8 ? "float64" : "float32",
             " array");
    Arr a = py::reinterpret_borrow<Arr>(h);
    PF_CHECK(a.ndim() == 2, "cost[", b, "] must have 2 dimensions (n, m); got ", a.ndim());
    Problem& p = problems[b];
    p.cost = a.data();
    p.n = a.shape(0);
    p.m = a.shape(1);
    p.num_matches = num_matches[b];
    PF_CHECK(p.num_matches <= std::min(p.n, p.m), "num_matches[", b, "] must be in [0, min(n, m)] = [0, ",
             std::min(p.n, p.m), "]; got ", p.num_matches);
    max_n = std::max(max_n, p.n);
    keep.push_back(std::move(a));
  }
  Options opt;
  opt.maximize = maximize;
  opt.has_unmatched_cost = unmatched_cost.has_value();
  opt.unmatched_cost = unmatched_cost.value_or(0.0);
  opt.num_threads = num_threads;
  py::array_t<int64_t> cols({B, max_n});
  py::array_t<double> totals({B});
  int64_t* cp = cols.mutable_data();
  double* tp = totals.mutable_data();
  {
    py::gil_scoped_release release;
    std::fill(cp, cp + B * max_n, int64_t(-1));
    pyfusion::lsap::solve_batch<T>(problems, opt, cp, max_n, tp);
  }
  return py::make_tuple(cols, totals);
}

}  // namespace

void bind_assignment(py::module_& m) {
  m.def("lsap_solve_f64", &solve_typed<double>, py::arg("costs"), py::arg("num_matches"), py::arg("maximize"),
        py::arg("unmatched_cost"), py::arg("num_threads"),
        "Solve a batch of float64 assignment problems. Returns (col_for_row (B, max n) int64 with -1 for "
        "unmatched rows, totals (B,) float64).");
  m.def("lsap_solve_f32", &solve_typed<float>, py::arg("costs"), py::arg("num_matches"), py::arg("maximize"),
        py::arg("unmatched_cost"), py::arg("num_threads"), "Same as lsap_solve_f64 for float32 costs.");
  m.def("lsap_simd_path", &pyfusion::lsap::simd_path, "SIMD path of the assignment kernels on this CPU");
  m.def("_lsap_set_simd_level", &pyfusion::lsap::set_simd_level, py::arg("name"),
        "Test hook: cap the SIMD level ('auto', 'avx512', 'avx2', 'default'); returns the previous path");
}
