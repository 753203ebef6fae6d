// CUDA cost epilogue of HF (see interp_cost.h): one thread per (i, j) pair, coalesced along j.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.h"
#include "interp/interp_cost.h"

namespace pyfusion::interp {

namespace {

__global__ void hf_cost_kernel(const double* __restrict__ M, const double* __restrict__ Q01,
                               const double* __restrict__ Q10, const double* __restrict__ d0,
                               const double* __restrict__ e0, const double* __restrict__ n0v,
                               const double* __restrict__ s0, const double* __restrict__ d1,
                               const double* __restrict__ e1, const double* __restrict__ n1v,
                               const double* __restrict__ s1, int64_t n0, int64_t n1, bool squared,
                               double* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = blockIdx.y;
  if (i >= n0 || j >= n1) return;
  const int64_t q = i * n1 + j;
  const double a = s0[i], b = s1[j];
  const double tot = a + b;
  const double u = a / tot, v = b / tot;
  const double common = u * u * d0[i] + v * v * d1[j] + 2.0 * u * v * M[q];
  const double da = fmax(common - 2.0 * u * e0[i] - 2.0 * v * Q10[q] + n0v[i], 0.0);
  const double db = fmax(common - 2.0 * u * Q01[q] - 2.0 * v * e1[j] + n1v[j], 0.0);
  out[q] = squared ? a * da + b * db : a * sqrt(da) + b * sqrt(db);
}

}  // namespace

void hf_cost_cuda(const double* M, const double* Q01, const double* Q10, const double* d0, const double* e0,
                  const double* n0v, const double* s0, const double* d1, const double* e1, const double* n1v,
                  const double* s1, int64_t n0, int64_t n1, bool squared, double* out, void* stream) {
  PF_CHECK(n0 >= 0 && n1 >= 0, "hf_cost (CUDA): sizes must be non-negative; got (", n0, ", ", n1, ")");
  PF_CHECK(n0 < 65536, "hf_cost (CUDA): n0 must be < 65536 (grid y limit); got ", n0);
  if (n0 == 0 || n1 == 0) return;
  const int threads = 256;
  dim3 grid(static_cast<unsigned>((n1 + threads - 1) / threads), static_cast<unsigned>(n0));
  hf_cost_kernel<<<grid, threads, 0, static_cast<cudaStream_t>(stream)>>>(M, Q01, Q10, d0, e0, n0v, s0, d1, e1, n1v,
                                                                          s1, n0, n1, squared, out);
  const cudaError_t err = cudaGetLastError();
  // A runtime failure (no driver, no device, bad launch) is a RuntimeError, not a ValueError about the arguments.
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("hf_cost (CUDA): kernel launch failed: ") + cudaGetErrorString(err));
}

}  // namespace pyfusion::interp
