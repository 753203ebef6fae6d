// The pyfusion._C extension: torch-free C++ engines bound with pybind11.
// Each engine lives in csrc/<engine>/ and registers its functions through bind_<engine>().
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

void bind_assignment(py::module_& m);
void bind_correlation(py::module_& m);
void bind_cluster(py::module_& m);
void bind_gather(py::module_& m);
void bind_gemm(py::module_& m);
void bind_interp(py::module_& m);
void bind_partial_linear(py::module_& m);
void bind_scatter(py::module_& m);

#ifdef PYFUSION_HAS_CUDA
#include <cuda_runtime_api.h>
#endif

static py::dict build_info() {
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_max_threads"] = 1;
#endif
#ifdef PYFUSION_HAS_CUDA
  info["cuda_compiled"] = true;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  info["cuda_device_count"] = err == cudaSuccess ? count : 0;
  info["cuda_error"] = err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
#else
  info["cuda_compiled"] = false;
  info["cuda_device_count"] = 0;
  info["cuda_error"] = std::string("the extension was built without CUDA (no CUDA compiler or PYFUSION_CUDA=OFF)");
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  return info;
}

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "pyfusion compiled engines (assignment, correlation, cluster, gather, gemm, interp, partial_linear, scatter); "
      "torch-free";
  m.def("build_info", &build_info, "Compile-time and runtime facts about the extension");
  bind_assignment(m);
  bind_correlation(m);
  bind_cluster(m);
  bind_gather(m);
  bind_gemm(m);
  bind_interp(m);
  bind_partial_linear(m);
  bind_scatter(m);
}
