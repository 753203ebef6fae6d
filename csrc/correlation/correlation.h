// Correlation engine: streaming joint moments of the concatenated activations [X_1 | ... | X_K].
//
// State (owned by the caller, float64): a shift vector c (D), the shifted first moment s1 = sum_n (x_n - c)
// (D) and the lower triangle of the shifted second moment s2 = sum_n (x_n - c)(x_n - c)^T (D x D, row
// major, entries with i >= j are valid; entries above the diagonal are scratch and never read). With c close
// to the mean (the caller uses the first batch's mean), s2 - s1 s1^T / N has no catastrophic cancellation,
// so a mean offset of 1e3 costs no accuracy; finalization and the Chan merge live in Python.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pyfusion {
namespace correlation {

// Element types of the input, as encoded by the Python wrapper.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Instruction-set choices of the CPU micro-kernel ("auto" picks the best the CPU supports).
enum class Isa : int { kAuto = 0, kAvx512 = 1, kAvx2 = 2, kScalar = 3 };

// Adds the rows of x (n x d, element (i, j) at x[i * stride_n + j * stride_d], strides in elements) to the
// state: s1 += sum_i (x_i - shift), lower(s2) += sum_i (x_i - shift)(x_i - shift)^T.
// `rects` (4 integers per rectangle: rows [r0, r1) x columns [c0, c1), inside the lower triangle) restricts the
// work: empty = the whole lower triangle; else only the diagonal macro blocks (every variance) and those meeting a
// rectangle are accumulated, so the entries of the requested rectangles and of the diagonal are valid and the
// others are left as they were (a cross block of two members costs one GEMM instead of the SYRK of both).
// Returns the name of the micro-kernel used.
std::string accumulate_cpu(const void* x, DType dtype, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d,
                           const double* shift, double* s1, double* s2, int threads, Isa isa,
                           const std::vector<int64_t>& rects = {});

// accumulate_cpu of x = [b_0 | ... | b_{nb-1}] without forming x: block b is (n, cols[b]) at address xs[b] with
// strides (stride_n[b], stride_d[b]) in elements, all of `dtype`; D = sum(cols). Equal to accumulate_cpu on the
// concatenation bit for bit (each row is gathered into a float32 row buffer, then packed as before).
std::string accumulate_blocks_cpu(const std::vector<uintptr_t>& xs, DType dtype, int64_t n,
                                  const std::vector<int64_t>& cols, const std::vector<int64_t>& stride_n,
                                  const std::vector<int64_t>& stride_d, const double* shift, double* s1, double* s2,
                                  int threads, Isa isa, const std::vector<int64_t>& rects = {});

// The CPU vendor ("intel", "amd" or "other"): oneMKL runs its AVX2 code paths on non-Intel CPUs, which decides
// whether torch's float32 GEMM or this engine's AVX-512 kernel is the faster cross block (pyfusion.ops.moments).
std::string cpu_vendor();

// The prepass of the BLAS path (pyfusion.ops.moments, backend "torch"): out (n x d, row-major float32) = x - shift,
// s1 += sum_i (x_i - shift) and sq[j * sq_stride] += sum_i (x_ij - shift_j)^2, float64 (sq_stride = d + 1 for the
// diagonal of s2); the caller's float32 GEMMs of out give the off-diagonal rectangles. Returns the instruction set.
std::string shift_cpu(const void* x, DType dtype, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d,
                      const double* shift, double* s1, double* sq, int64_t sq_stride, float* out, int threads);

// dst[i * ld_dst + j] += src[i * ld_src + j] (float32 -> float64) for i < rows, j < cols: the float64 add of a GEMM
// result into a block of s2 (torch's mixed-dtype add into a strided block ran at a third of this speed).
void add_f32_cpu(double* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows, int64_t cols,
                 int threads);

// The best micro-kernel this CPU supports ("avx512", "avx2" or "scalar").
std::string best_isa();

#ifdef PYFUSION_HAS_CUDA
// Same semantics on the GPU: every pointer is a device pointer, work is queued on `stream` (a cudaStream_t).
void accumulate_cuda(const void* x, DType dtype, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d,
                     const double* shift, double* s1, double* s2, void* stream);
#endif

}  // namespace correlation
}  // namespace pyfusion
