// Cost epilogue of Hungarian neuron-interpolation fusion (HF, Luenam et al. 2025; papers.md B.3, C.2 item 3).
//
// For neuron i of member 0 and neuron j of member 1 with importance s0_i, s1_j, least-squares weights w0_i, w1_j
// (fitted on the fused model's inputs X) and targets a0_i, a1_j, the interpolated prediction is
//   p_ij = X (u w0_i + v w1_j),   u = s0_i / (s0_i + s1_j),  v = s1_j / (s0_i + s1_j),
// and the cost is  s0_i f(||p_ij - a0_i||^2) + s1_j f(||p_ij - a1_j||^2), f = identity or sqrt.
// With G = X^T X and C_k = X^T A_k, both squared norms expand into Gram products:
//   ||p_ij - a0_i||^2 = u^2 d0_i + v^2 d1_j + 2uv M_ij - 2u e0_i - 2v Q10_ij + n0_i
//   ||p_ij - a1_j||^2 = u^2 d0_i + v^2 d1_j + 2uv M_ij - 2u Q01_ij - 2v e1_j + n1_j
// with M = W0^T G W1, Q10 = C0^T W1 (a0_i . X w1_j), Q01 = W0^T C1 (X w0_i . a1_j), d_k = diag(W_k^T G W_k),
// e_k = diag(W_k^T C_k), n_k = squared norms of the targets. No per-pair prediction is ever formed.
#pragma once

#include <cstdint>

namespace pyfusion::interp {

// All matrices (n0, n1) row-major float64, vectors float64. Negative squared distances (rounding) clamp to 0.
void hf_cost_cpu(const double* M, const double* Q01, const double* Q10, const double* d0, const double* e0,
                 const double* n0v, const double* s0, const double* d1, const double* e1, const double* n1v,
                 const double* s1, int64_t n0, int64_t n1, bool squared, double* out, int num_threads);

#ifdef PYFUSION_HAS_CUDA
// Same on device pointers, on the caller's stream (cudaStream_t passed as void*).
void hf_cost_cuda(const double* M, const double* Q01, const double* Q10, const double* d0, const double* e0,
                  const double* n0v, const double* s0, const double* d1, const double* e1, const double* n1v,
                  const double* s1, int64_t n0, int64_t n1, bool squared, double* out, void* stream);
#endif

}  // namespace pyfusion::interp
