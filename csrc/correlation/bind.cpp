// pybind11 bindings of the correlation engine. Buffers travel as integer addresses (data_ptr) plus sizes and
// strides, so the module stays torch-free; the Python wrapper (pyfusion.stats) owns and validates them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "common.h"
#include "correlation/correlation.h"

namespace py = pybind11;
namespace corr = pyfusion::correlation;

namespace {

corr::Isa parse_isa(const std::string& isa) {
  if (isa == "auto") return corr::Isa::kAuto;
  if (isa == "avx512") return corr::Isa::kAvx512;
  if (isa == "avx2") return corr::Isa::kAvx2;
  if (isa == "scalar") return corr::Isa::kScalar;
  pyfusion::fail("isa must be one of 'auto', 'avx512', 'avx2', 'scalar'; got '", isa, "'");
}

corr::DType parse_dtype(int code) {
  PF_CHECK(code >= 0 && code <= 2, "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16); got ", code);
  return static_cast<corr::DType>(code);
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

void bind_correlation(py::module_& m) {
  m.def(
      "corr_accumulate",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d, uintptr_t shift,
         uintptr_t s1, uintptr_t s2, int threads, const std::string& isa, const std::vector<int64_t>& rects) {
        const corr::Isa which = parse_isa(isa);
        const corr::DType dt = parse_dtype(dtype);
        py::gil_scoped_release release;
        return corr::accumulate_cpu(ptr<const void>(x), dt, n, d, stride_n, stride_d, ptr<const double>(shift),
                                    ptr<double>(s1), ptr<double>(s2), threads, which, rects);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("stride_n"), py::arg("stride_d"),
      py::arg("shift"), py::arg("s1"), py::arg("s2"), py::arg("threads") = 0, py::arg("isa") = "auto",
      py::arg("rects") = std::vector<int64_t>{},
      "Add rows of x (n, d) shifted by `shift` (d,) to s1 (d,) and the lower triangle of s2 (d, d), float64, in "
      "place. Addresses are integers (tensor.data_ptr()); strides in elements. `rects` [r0, r1, c0, c1, ...]: "
      "accumulate only the diagonal macro blocks and those meeting these rectangles of the lower triangle (empty: "
      "all). Returns the micro-kernel name.");
  m.def(
      "corr_accumulate_blocks",
      [](const std::vector<uintptr_t>& xs, int dtype, int64_t n, const std::vector<int64_t>& cols,
         const std::vector<int64_t>& stride_n, const std::vector<int64_t>& stride_d, uintptr_t shift, uintptr_t s1,
         uintptr_t s2, int threads, const std::string& isa, const std::vector<int64_t>& rects) {
        const corr::Isa which = parse_isa(isa);
        const corr::DType dt = parse_dtype(dtype);
        py::gil_scoped_release release;
        return corr::accumulate_blocks_cpu(xs, dt, n, cols, stride_n, stride_d, ptr<const double>(shift),
                                           ptr<double>(s1), ptr<double>(s2), threads, which, rects);
      },
      py::arg("xs"), py::arg("dtype"), py::arg("n"), py::arg("cols"), py::arg("stride_n"), py::arg("stride_d"),
      py::arg("shift"), py::arg("s1"), py::arg("s2"), py::arg("threads") = 0, py::arg("isa") = "auto",
      py::arg("rects") = std::vector<int64_t>{},
      "corr_accumulate of x = [b_0 | ... | b_{K-1}] without forming x: xs[k] the address of block k (n, cols[k]) "
      "with strides (stride_n[k], stride_d[k]) in elements, one dtype for all; D = sum(cols). Bit for bit the "
      "result of corr_accumulate on the concatenation. Returns the micro-kernel name.");
  m.def("corr_cpu_vendor", &corr::cpu_vendor,
        "The CPU vendor: 'intel', 'amd' or 'other' (oneMKL runs its AVX2 code on non-Intel CPUs)");
  m.def(
      "corr_shift",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d, uintptr_t shift,
         uintptr_t s1, uintptr_t sq, int64_t sq_stride, uintptr_t out, int threads) {
        const corr::DType dt = parse_dtype(dtype);
        py::gil_scoped_release release;
        return corr::shift_cpu(ptr<const void>(x), dt, n, d, stride_n, stride_d, ptr<const double>(shift),
                               ptr<double>(s1), ptr<double>(sq), sq_stride, ptr<float>(out), threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("stride_n"), py::arg("stride_d"),
      py::arg("shift"), py::arg("s1"), py::arg("sq"), py::arg("sq_stride"), py::arg("out"), py::arg("threads") = 0,
      "Prepass of the BLAS path: out (n, d) row-major float32 = x - shift; s1 (d,) += sum (x - shift) and "
      "sq[j * sq_stride] += sum (x_j - shift_j)^2, float64, in place (sq_stride = d + 1: the diagonal of s2). "
      "Returns the instruction set used.");
  m.def(
      "corr_add_f32",
      [](uintptr_t dst, int64_t ld_dst, uintptr_t src, int64_t ld_src, int64_t rows, int64_t cols, int threads) {
        py::gil_scoped_release release;
        corr::add_f32_cpu(ptr<double>(dst), ld_dst, ptr<const float>(src), ld_src, rows, cols, threads);
      },
      py::arg("dst"), py::arg("ld_dst"), py::arg("src"), py::arg("ld_src"), py::arg("rows"), py::arg("cols"),
      py::arg("threads") = 0,
      "dst (rows, cols; row stride ld_dst, float64) += src (row stride ld_src, float32), in place.");
  m.def("corr_best_isa", &corr::best_isa, "The micro-kernel the CPU path uses by default");
#ifdef PYFUSION_HAS_CUDA
  m.def(
      "corr_accumulate_cuda",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d, uintptr_t shift,
         uintptr_t s1, uintptr_t s2, uintptr_t stream) {
        const corr::DType dt = parse_dtype(dtype);
        py::gil_scoped_release release;
        corr::accumulate_cuda(ptr<const void>(x), dt, n, d, stride_n, stride_d, ptr<const double>(shift),
                              ptr<double>(s1), ptr<double>(s2), reinterpret_cast<void*>(stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("stride_n"), py::arg("stride_d"),
      py::arg("shift"), py::arg("s1"), py::arg("s2"), py::arg("stream") = 0,
      "GPU version of corr_accumulate: device addresses, queued on the given cudaStream_t (0: default stream).");
#endif
}
