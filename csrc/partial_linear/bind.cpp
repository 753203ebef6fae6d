// pybind11 bindings of the small-batch partial_linear kernel (partial_linear.h). The Python side passes
// data pointers and sizes (torch-free); it has validated shapes, dtypes and devices before the call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "common.h"
#include "partial_linear/panel_linear.h"
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

namespace pl = pyfusion::panel_linear;

template <typename T>
void panel_forward(const pl::Plan& plan, uintptr_t x, int64_t rows, int64_t sx, uintptr_t packed, uintptr_t bias,
                   uintptr_t y, int64_t sy, int num_threads) {
  PF_CHECK(rows >= 0, "partial_linear (panels): rows must be >= 0; got ", rows);
  if (rows > 0 && plan.o_total > 0) {
    PF_CHECK(x != 0 || plan.i_total == 0, "partial_linear (panels): x is a null pointer");
    PF_CHECK(y != 0, "partial_linear (panels): y is a null pointer");
    PF_CHECK(packed != 0 || plan.macs_per_row == 0, "partial_linear (panels): the packed weight is a null pointer");
  }
  auto call = [&] {
    pl::forward<T>(plan, reinterpret_cast<const T*>(x), rows, sx, reinterpret_cast<const T*>(packed),
                   reinterpret_cast<const T*>(bias), reinterpret_cast<T*>(y), sy, num_threads);
  };
  if (rows * plan.macs_per_row >= kReleaseGilMacs) {
    py::gil_scoped_release release;
    call();
  } else {
    call();
  }
}

template <typename T>
void panel_pack_segments(const pl::Plan& plan, uintptr_t src, uintptr_t dst) {
  PF_CHECK((src != 0 && dst != 0) || plan.macs_per_row == 0, "partial_linear (panels): null buffer pointer");
  py::gil_scoped_release release;
  pl::pack_segments<T>(plan, reinterpret_cast<const T*>(src), reinterpret_cast<T*>(dst));
}

template <typename T>
void panel_pack_blocks(const pl::Plan& plan, uintptr_t ws, uintptr_t wc, uintptr_t wd, uintptr_t dst) {
  PF_CHECK(dst != 0 || plan.packed_size(sizeof(T)) == 0, "partial_linear (panels): null destination pointer");
  py::gil_scoped_release release;
  pl::pack_blocks<T>(plan, reinterpret_cast<const T*>(ws), reinterpret_cast<const T*>(wc),
                     reinterpret_cast<const T*>(wd), reinterpret_cast<T*>(dst));
}

template <typename T>
void panel_unpack(const pl::Plan& plan, uintptr_t packed, uintptr_t dense) {
  PF_CHECK(dense != 0 || plan.o_total * plan.i_total == 0, "partial_linear (panels): null destination pointer");
  py::gil_scoped_release release;
  pl::unpack_dense<T>(plan, reinterpret_cast<const T*>(packed), reinterpret_cast<T*>(dense));
}

}  // namespace

void bind_partial_linear(py::module_& m) {
  py::class_<pl::Plan>(m, "PanelLinearPlan",
                       "Panel-packed partial linear engine (csrc/partial_linear/panel_linear.h): input / output "
                       "segments with member masks (block (o, i) stored iff masks intersect), any batch size, "
                       "activation 0 none, 1 relu, 2 gelu (erf), 3 silu.")
      .def(py::init<const std::vector<int64_t>&, const std::vector<uint64_t>&, const std::vector<int64_t>&,
                    const std::vector<uint64_t>&, int>(),
           py::arg("in_sizes"), py::arg("in_masks"), py::arg("out_sizes"), py::arg("out_masks"), py::arg("activation"))
      .def_readonly("i_total", &pl::Plan::i_total)
      .def_readonly("o_total", &pl::Plan::o_total)
      .def_readonly("macs_per_row", &pl::Plan::macs_per_row)
      .def_readonly("k_of_out", &pl::Plan::k_of_out, "allowed input columns K_o of each output segment")
      .def_readonly("segment_offset", &pl::Plan::segment_offset,
                    "storage format: start of W_o (O_o, K_o) in the flat buffer; the last entry is the total size")
      .def_property_readonly(
          "ranges",
          [](const pl::Plan& p) {
            std::vector<std::vector<std::pair<int64_t, int64_t>>> out;
            for (const auto& rg : p.ranges) {
              std::vector<std::pair<int64_t, int64_t>> v;
              for (const auto& r : rg) v.emplace_back(r.start, r.len);
              out.push_back(std::move(v));
            }
            return out;
          },
          "per output segment: the (start, length) input column ranges it reads, increasing")
      .def_readwrite("parallel_min_macs", &pl::Plan::parallel_min_macs,
                     "OpenMP over (output tile, row group) units from this many multiply-adds per call")
      .def("packed_size", &pl::Plan::packed_size, py::arg("elem_bytes"),
           "elements of the execution (panel) format for 4-byte (float32) or 8-byte (float64) elements")
      .def("panel_offset", &pl::Plan::panel_offset, py::arg("segment"), py::arg("elem_bytes"))
      .def("allowed", &pl::Plan::allowed, py::arg("out_segment"), py::arg("in_segment"))
      .def("pack_segments_f32", &panel_pack_segments<float>, py::arg("src"), py::arg("dst"),
           "storage format (segment_offset[-1] floats) -> panels (packed_size(4) floats); data pointers")
      .def("pack_segments_f64", &panel_pack_segments<double>, py::arg("src"), py::arg("dst"))
      .def("pack_blocks_f32", &panel_pack_blocks<float>, py::arg("w_shared"), py::arg("w_cross"), py::arg("w_diag"),
           py::arg("dst"), "the 3-buffer format of ops.partial_linear (standard masks only) -> panels")
      .def("pack_blocks_f64", &panel_pack_blocks<double>, py::arg("w_shared"), py::arg("w_cross"), py::arg("w_diag"),
           py::arg("dst"))
      .def("unpack_dense_f32", &panel_unpack<float>, py::arg("packed"), py::arg("dense"),
           "panels -> dense (O_total, I_total) with zeros in the blocks that are not stored")
      .def("unpack_dense_f64", &panel_unpack<double>, py::arg("packed"), py::arg("dense"))
      .def("forward_f32", &panel_forward<float>, py::arg("x"), py::arg("rows"), py::arg("x_row_stride"),
           py::arg("packed"), py::arg("bias"), py::arg("y"), py::arg("y_row_stride"), py::arg("num_threads"),
           "y (rows, O_total) = act(x W^T + b) from data pointers (float32); x rows of unit column stride; bias 0 "
           "for none; num_threads <= 0: OpenMP's default")
      .def("forward_f64", &panel_forward<double>, py::arg("x"), py::arg("rows"), py::arg("x_row_stride"),
           py::arg("packed"), py::arg("bias"), py::arg("y"), py::arg("y_row_stride"), py::arg("num_threads"));
  m.def("panel_linear_isa", &pl::isa, "The SIMD variant of the panel engine in use: 'avx512', 'avx2' or 'default'.");
  m.def("panel_linear_set_isa", &pl::set_isa, py::arg("name"),
        "Force a variant the CPU supports ('avx512', 'avx2', 'default'; 'auto' = the best), for tests.");

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
