// C = A B^T in float64 for the squared-distance cost (pyfusion.match.distance.sqdist): a packed, register-blocked
// AVX-512 kernel, compiled for AVX-512F by a target attribute and chosen at run time (the module itself stays
// baseline x86-64). Torch-free.
#pragma once

#include <cstdint>

namespace pyfusion::gemm {

// Whether this CPU runs the AVX-512 kernel (cpuid); false: callers use their BLAS.
bool abt_f64_supported();

// c (m, n; row stride ldc) = a (m, k; row stride lda) times b (n, k; row stride ldb) transposed. Each entry is one
// dot product accumulated in k order within blocks of kKc, blocks added in order (a fixed, deterministic order,
// different from a BLAS's). Row blocks of c run on up to `threads` OpenMP threads (<= 0: the runtime default); the
// values do not depend on the thread count. sq_a (m) / sq_b (n), when not null, get the rows' sums of squares,
// computed while packing (no second pass over a and b): per depth panel in k order, panels added in order, so an
// identical row of a and of b gets identical bits. Requires abt_f64_supported().
void abt_f64(const double* a, const double* b, double* c, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
             int64_t ldc, int threads, double* sq_a = nullptr, double* sq_b = nullptr);

}  // namespace pyfusion::gemm
