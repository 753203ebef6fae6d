// pybind11 bindings of the assignment engine: numpy buffers in, numpy buffers out, GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "assignment/lsap.h"
#include "assignment/lsap_batch.h"
#include "common.h"

namespace py = pybind11;
using pyfusion::lsap::Options;
using pyfusion::lsap::Problem;

namespace {

template <typename T>
py::tuple solve_typed(const py::list& costs, const std::vector<int64_t>& num_matches, bool maximize,
                      std::optional<double> unmatched_cost, int num_threads, const std::string& partial_engine) {
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
  PF_CHECK(partial_engine == "auto" || partial_engine == "direct" || partial_engine == "padded",
           "partial_engine must be 'auto', 'direct' or 'padded'; got '", partial_engine, "'");
  opt.partial_engine = partial_engine == "direct"   ? pyfusion::lsap::PartialEngine::kDirect
                       : partial_engine == "padded" ? pyfusion::lsap::PartialEngine::kPadded
                                                    : pyfusion::lsap::PartialEngine::kAuto;
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

namespace lb = pyfusion::lsap_batch;

lb::Options batch_options(bool maximize, std::optional<double> unmatched_cost) {
  lb::Options o;
  o.maximize = maximize;
  o.has_unmatched_cost = unmatched_cost.has_value();
  o.unmatched_cost = unmatched_cost.value_or(0.0);
  return o;
}

// The GPU algorithm on the CPU (an emulated team of `lanes` lanes): same inputs and outputs as solve_typed.
template <typename T>
py::tuple solve_team(const py::list& costs, const std::vector<int64_t>& num_matches, bool maximize,
                     std::optional<double> unmatched_cost, int lanes) {
  using Arr = py::array_t<T, py::array::c_style>;
  const int64_t B = static_cast<int64_t>(costs.size());
  PF_CHECK(static_cast<int64_t>(num_matches.size()) == B, "num_matches must have one entry per problem (", B,
           "); got ", num_matches.size());
  std::vector<Arr> keep;
  std::vector<lb::ProblemView<T>> problems(B);
  int64_t max_n = 0;
  for (int64_t b = 0; b < B; ++b) {
    py::handle h = costs[b];
    PF_CHECK(py::isinstance<Arr>(h), "cost[", b, "] must be a C-contiguous ", sizeof(T) == 8 ? "float64" : "float32",
             " array");
    Arr a = py::reinterpret_borrow<Arr>(h);
    PF_CHECK(a.ndim() == 2, "cost[", b, "] must have 2 dimensions (n, m); got ", a.ndim());
    problems[b] = lb::ProblemView<T>{a.data(), a.shape(0), a.shape(1), num_matches[b]};
    max_n = std::max<int64_t>(max_n, a.shape(0));
    keep.push_back(std::move(a));
  }
  const lb::Options opt = batch_options(maximize, unmatched_cost);
  py::array_t<int64_t> cols({B, max_n});
  py::array_t<double> totals({B});
  int64_t* cp = cols.mutable_data();
  double* tp = totals.mutable_data();
  {
    py::gil_scoped_release release;
    std::fill(cp, cp + B * max_n, int64_t(-1));
    lb::solve_batch_emulated<T>(problems, opt, lanes, cp, max_n, tp);
  }
  return py::make_tuple(cols, totals);
}

#ifdef PYFUSION_HAS_CUDA
template <typename T>
void solve_cuda(const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& ns, const std::vector<int64_t>& ms,
                const std::vector<int64_t>& num_matches, const lb::Options& opt, uintptr_t out, int64_t stride,
                uintptr_t totals, uintptr_t stream) {
  const size_t B = ptrs.size();
  PF_CHECK(ns.size() == B && ms.size() == B && num_matches.size() == B,
           "lsap_solve_cuda: ptrs, ns, ms and num_matches must have one entry per problem; got ", B, ", ", ns.size(),
           ", ", ms.size(), ", ", num_matches.size());
  PF_CHECK(B == 0 || (out != 0 && totals != 0), "lsap_solve_cuda: null output pointer");
  std::vector<lb::ProblemView<T>> problems(B);
  for (size_t b = 0; b < B; ++b)
    problems[b] = lb::ProblemView<T>{reinterpret_cast<const T*>(ptrs[b]), ns[b], ms[b], num_matches[b]};
  py::gil_scoped_release release;
  lb::solve_batch_cuda<T>(problems, opt, reinterpret_cast<int64_t*>(out), stride, reinterpret_cast<double*>(totals),
                          reinterpret_cast<void*>(stream));
}
#endif

}  // namespace

void bind_assignment(py::module_& m) {
  m.def("lsap_solve_team_f64", &solve_team<double>, py::arg("costs"), py::arg("num_matches"), py::arg("maximize"),
        py::arg("unmatched_cost"), py::arg("lanes"),
        "The batched GPU assignment algorithm (lsap_batch.h) on the CPU with an emulated team of `lanes` lanes; "
        "same arguments and results as lsap_solve_f64 (tests and a reference for the CUDA path).");
  m.def("lsap_solve_team_f32", &solve_team<float>, py::arg("costs"), py::arg("num_matches"), py::arg("maximize"),
        py::arg("unmatched_cost"), py::arg("lanes"), "lsap_solve_team_f64 for float32 costs.");
#ifdef PYFUSION_HAS_CUDA
  m.def(
      "lsap_solve_cuda",
      [](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& ns, const std::vector<int64_t>& ms,
         const std::vector<int64_t>& num_matches, int dtype, bool maximize, std::optional<double> unmatched_cost,
         uintptr_t out, int64_t out_stride, uintptr_t totals, uintptr_t stream) {
        PF_CHECK(dtype == 0 || dtype == 1, "lsap_solve_cuda: dtype must be 0 (float32) or 1 (float64); got ", dtype);
        const lb::Options opt = batch_options(maximize, unmatched_cost);
        if (dtype == 0) {
          solve_cuda<float>(ptrs, ns, ms, num_matches, opt, out, out_stride, totals, stream);
        } else {
          solve_cuda<double>(ptrs, ns, ms, num_matches, opt, out, out_stride, totals, stream);
        }
      },
      py::arg("ptrs"), py::arg("ns"), py::arg("ms"), py::arg("num_matches"), py::arg("dtype"), py::arg("maximize"),
      py::arg("unmatched_cost"), py::arg("out"), py::arg("out_stride"), py::arg("totals"), py::arg("stream") = 0,
      "Batched exact assignment on the GPU. ptrs: device addresses of C-contiguous (n_b, m_b) costs (one dtype); "
      "out: device int64 (B, out_stride) column per row (-1 unmatched; rows >= n_b untouched); totals: device "
      "float64 (B,). Synchronises the stream. ValueError as the CPU solver; RuntimeError without a usable GPU.");
#endif
  m.def("lsap_solve_f64", &solve_typed<double>, py::arg("costs"), py::arg("num_matches"), py::arg("maximize"),
        py::arg("unmatched_cost"), py::arg("num_threads"), py::arg("partial_engine") = "auto",
        "Solve a batch of float64 assignment problems. Returns (col_for_row (B, max n) int64 with -1 for "
        "unmatched rows, totals (B,) float64). partial_engine: 'auto' (direct k-cardinality solver, the "
        "sink-padded square problem for num_matches > 0.8 min(n, m)), 'direct' or 'padded' (tests, benchmarks).");
  m.def("lsap_solve_f32", &solve_typed<float>, py::arg("costs"), py::arg("num_matches"), py::arg("maximize"),
        py::arg("unmatched_cost"), py::arg("num_threads"), py::arg("partial_engine") = "auto",
        "Same as lsap_solve_f64 for float32 costs.");
  m.def("lsap_simd_path", &pyfusion::lsap::simd_path, "SIMD path of the assignment kernels on this CPU");
  m.def("_lsap_set_simd_level", &pyfusion::lsap::set_simd_level, py::arg("name"),
        "Test hook: cap the SIMD level ('auto', 'avx512', 'avx2', 'default'); returns the previous path");
}
