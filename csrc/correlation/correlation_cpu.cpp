// CPU kernel of the correlation engine: lower triangle of sum_n (x_n - c)(x_n - c)^T at GEMM speed.
//
// Scheme (a SYRK in the BLIS style, specialised for float64 accumulation of float32 products):
//   * rows are taken in super-chunks of up to kMaxChunk samples (32 MiB packed at most). Each super-chunk is
//     shifted by c, rounded to float32 and packed ONCE, in panels of kPanelW = 48 columns, k-major (panel q holds
//     v[k, 48q .. 48q+47] at row k). Both GEMM operands read that one copy: the broadcast operand (MR rows,
//     MR | 48) at an offset inside a panel, the vector operand (NR columns, NR | 48) as whole vectors of a row;
//   * the lower triangle is cut into macro blocks of kMacro x kMacro entries. A thread owns a macro block for a
//     whole super-chunk: its float64 accumulator (kMacro^2 doubles, 72 KiB, contiguous: no set aliasing of the
//     D-strided rows of s2) stays in L2 while every micro-tile of the block runs over the super-chunk in depth
//     steps of kDepth samples; then it is added to s2 once. (The previous kernel added every tile to s2 after
//     each 256 samples, from memory once s2 left the cache, and packed the panel twice: ~58% of the fp32 GEMM
//     rate at N = 4096, D = 2048.)
//   * a register-blocked micro-kernel computes an MR x NR tile in float32 over kDepth samples and adds it to the
//     float64 accumulator, so float32 sums never run over more than kDepth shifted products whatever N;
//   * only micro-tiles that touch the lower triangle are computed (half the flops of X^T X);
//   * OpenMP: threads split the packing by rows and the macro blocks dynamically; no per-thread D x D partial.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PF_X86 1
#endif

#include "common.h"
#include "correlation/correlation.h"

// GCC 12's own AVX-512 headers trip -W(maybe-)uninitialized (_mm512_undefined_* inside the intrinsics).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace pyfusion {
namespace correlation {
namespace {

// Columns per packed panel: a multiple of every tile width and height below (AVX-512 8 x 48, AVX2 6 x 16,
// scalar 4 x 8), and 192 bytes = 3 cache lines, so every packed row of a panel starts on a cache line.
constexpr int64_t kPanelW = 48;
// Samples per micro-kernel call = length of the float32 partial sums. Max covariance error / (sd_a sd_b) against a
// long-double reference (N = 16384, D = 300, correlated Gaussian columns): 64 -> 1.6e-8 (offset data, mean 1e3:
// 4.7e-8; bit-for-bit the previous kernel's, which flushed every 64 samples), 128 -> 4.1e-8 (8.6e-8), 256 -> 7.0e-8
// (1.3e-7); the float32 torch composite on centred data: ~2.5e-7. 128 saved ~4% of the FMA-port uops (one float64
// flush per 128 FMAs per accumulator instead of 64) and was within the noise of the loaded VM, so the accuracy wins.
// The vector operand's micro-panel (64 x 48 floats = 12 KiB) stays in L1 while the broadcast operand streams from L2.
constexpr int64_t kDepth = 64;
// Macro block edge (entries): a multiple of kPanelW and of every MR; 96 x 96 doubles = 72 KiB stay in L2.
constexpr int64_t kMacro = 96;
// Samples per super-chunk: the packed copy holds chunk x D floats, at most kPackFloats (32 MiB), so a call of
// N = 4096 samples at D <= 2048 is one chunk. Each chunk costs two thread barriers (pack -> compute -> next pack)
// and one pass of every macro accumulator into s2, so longer chunks cost less; on the loaded 2-core VM each
// barrier waits whenever the other thread is descheduled.
constexpr int64_t kMaxChunk = 8192;
constexpr int64_t kPackFloats = int64_t(8) << 20;

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using Buffer = std::unique_ptr<T[], AlignedFree>;

template <typename T>
Buffer<T> alloc_aligned(int64_t count, const char* what) {
  size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
  bytes = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  PF_CHECK(p != nullptr, "correlation: could not allocate ", bytes, " bytes for ", what);
  return Buffer<T>(static_cast<T*>(p));
}

inline float half_to_float(uint16_t h) {
  // IEEE binary16 -> binary32, including subnormals, infinities and NaN.
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline float load(const T* p);
template <>
inline float load<float>(const float* p) {
  return *p;
}
struct Half {
  uint16_t bits;
};
struct BHalf {
  uint16_t bits;
};
template <>
inline float load<Half>(const Half* p) {
  return half_to_float(p->bits);
}
template <>
inline float load<BHalf>(const BHalf* p) {
  return bf16_to_float(p->bits);
}

// c[r * ldc + j] += sum_{k < K} a[k * kPanelW + r] * b[k * kPanelW + j] for r < MR, j < NR; K <= kDepth.
// a and b point into packed panels (row stride kPanelW floats); c is the float64 macro accumulator. `cols` (<= NR)
// is how many leading columns the caller needs (a kernel may compute more).

template <int MR, int NR>
void kernel_scalar(int64_t K, const float* a, const float* b, double* c, int64_t ldc, int /*cols*/) {
  float acc[MR][NR] = {};
  for (int64_t k = 0; k < K; ++k) {
    for (int r = 0; r < MR; ++r) {
      const float ar = a[k * kPanelW + r];
      for (int j = 0; j < NR; ++j) acc[r][j] += ar * b[k * kPanelW + j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) c[r * ldc + j] += acc[r][j];
}

#ifdef PF_X86
// c[0:16] += v (float32 -> float64).
__attribute__((target("avx512f"))) inline void add16(double* c, __m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  _mm512_storeu_pd(c, _mm512_add_pd(_mm512_loadu_pd(c), _mm512_cvtps_pd(lo)));
  _mm512_storeu_pd(c + 8, _mm512_add_pd(_mm512_loadu_pd(c + 8), _mm512_cvtps_pd(hi)));
}

// c[0:8] += v (float32 -> float64).
__attribute__((target("avx2,fma"))) inline void add8(double* c, __m256 v) {
  _mm256_storeu_pd(c, _mm256_add_pd(_mm256_loadu_pd(c), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
  _mm256_storeu_pd(c + 4, _mm256_add_pd(_mm256_loadu_pd(c + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
}

// 8 x (16 NV) tile: 8 NV zmm accumulators; per sample NV vector loads (a whole packed panel row when NV = 3) and 8
// broadcasts for 8 NV FMAs (11 loads per 12 FMA cycles on a 2-FMA-port core at NV = 3; the 12 x 32 shape needed
// 14). NV < 3 serves the tiles that cross the diagonal, whose right-hand columns lie above it.
template <int NV>
__attribute__((target("avx512f"))) void kernel_avx512_nv(int64_t K, const float* a, const float* b, double* c,
                                                         int64_t ldc) {
  constexpr int MR = 8;
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * kPanelW;
    __m512 bv[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_ps(bk + 16 * v);
    const float* ak = a + k * kPanelW;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(ak[r]);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) add16(c + r * ldc + 16 * v, acc[r][v]);
}

__attribute__((target("avx512f"))) void kernel_avx512(int64_t K, const float* a, const float* b, double* c,
                                                      int64_t ldc, int cols) {
  if (cols <= 16) return kernel_avx512_nv<1>(K, a, b, c, ldc);
  if (cols <= 32) return kernel_avx512_nv<2>(K, a, b, c, ldc);
  kernel_avx512_nv<3>(K, a, b, c, ldc);
}

// 6 x 16 tile: 12 ymm accumulators (the classic Haswell/Zen 2 shape).
__attribute__((target("avx2,fma"))) void kernel_avx2(int64_t K, const float* a, const float* b, double* c,
                                                     int64_t ldc, int /*cols*/) {
  constexpr int MR = 6;
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm256_setzero_ps();
    acc1[r] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kPanelW);
    const __m256 b1 = _mm256_loadu_ps(b + k * kPanelW + 8);
    const float* ak = a + k * kPanelW;
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_broadcast_ss(ak + r);
      acc0[r] = _mm256_fmadd_ps(ar, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(ar, b1, acc1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    add8(c + r * ldc, acc0[r]);
    add8(c + r * ldc + 8, acc1[r]);
  }
}
#endif

// Row conversion to float32 (n contiguous elements). The generic forms are scalar; the ISA variants convert 16 / 8
// halves per instruction (F16C / AVX-512F) and bfloat16 by a 16-bit shift.
template <typename T>
void convert_generic(const T* src, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = load<T>(src + j);
}

#ifdef PF_X86
__attribute__((target("avx512f"))) void convert_half_avx512(const Half* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
  for (; j < n; ++j) dst[j] = half_to_float(src[j].bits);
}
__attribute__((target("avx512f"))) void convert_bf16_avx512(const BHalf* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j)));
    _mm512_storeu_ps(dst + j, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  for (; j < n; ++j) dst[j] = bf16_to_float(src[j].bits);
}
__attribute__((target("avx2,f16c"))) void convert_half_avx2(const Half* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  for (; j < n; ++j) dst[j] = half_to_float(src[j].bits);
}
__attribute__((target("avx2"))) void convert_bf16_avx2(const BHalf* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
    _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; j < n; ++j) dst[j] = bf16_to_float(src[j].bits);
}
#endif

static_assert(kPanelW % 8 == 0 && kPanelW % 6 == 0 && kPanelW % 16 == 0, "panel width must fit every tile");
static_assert(kMacro % kPanelW == 0 && kMacro % 8 == 0 && kMacro % 6 == 0, "macro block must fit every tile");

#define PF_ALWAYS_INLINE inline __attribute__((always_inline))

// A batch given as nb column blocks of one dtype: block b is (n, cols[b]) at x[b] with strides (sn[b], sd[b]).
template <typename T>
struct BlockRows {
  int64_t nb;
  const T* const* x;
  const int64_t* cols;
  const int64_t* sn;
  const int64_t* sd;
};

// One row of d values (stride sd) as contiguous float32: the row itself when it already is, else converted or
// gathered into `row` (scratch of d floats). Shared by the engine's packing and the BLAS path's shift prepass.
template <typename T, typename Convert>
PF_ALWAYS_INLINE const float* row_as_float(const T* xr, int64_t d, int64_t sd, float* row, Convert convert) {
  if constexpr (std::is_same<T, float>::value) {
    (void)convert;
    if (sd == 1) return xr;
    for (int64_t j = 0; j < d; ++j) row[j] = xr[j * sd];
    return row;
  } else {
    if (sd == 1) {
      convert(xr, d, row);
    } else {
      for (int64_t j = 0; j < d; ++j) row[j] = load<T>(xr + j * sd);
    }
    return row;
  }
}

// Packs one row of x, shifted, into the panels (row k of each panel, panels panel_stride floats apart) and adds the
// shifted values to the float64 s1 partial. Columns d .. dp-1 stay zero (set once at allocation). v = x - c in
// float32 is exact (Sterbenz) or correctly rounded: the caller passes a float32-representable shift close to x.
// Its float64 sum goes into s1 (a float32 chunk sum lost 5e-7 relative accuracy in s1, which the raw Gram
// multiplies by the offset c). `row` is scratch for converted or strided rows; `convert` turns d contiguous T
// into float32.
template <typename T, typename Convert>
PF_ALWAYS_INLINE void pack_row_impl(const T* xr, int64_t d, int64_t sd, const float* cshift, float* panels,
                                    int64_t panel_stride, int64_t k, double* s1_local, float* row, Convert convert) {
  const float* src = row_as_float(xr, d, sd, row, convert);
  for (int64_t j0 = 0; j0 < d; j0 += kPanelW) {
    const int64_t jn = std::min<int64_t>(kPanelW, d - j0);
    float* __restrict dst = panels + (j0 / kPanelW) * panel_stride + k * kPanelW;
    const float* __restrict s = src + j0;
    const float* __restrict c = cshift + j0;
    double* __restrict acc = s1_local + j0;
    for (int64_t j = 0; j < jn; ++j) {
      const float v = s[j] - c[j];
      dst[j] = v;
      acc[j] += static_cast<double>(v);
    }
  }
}

// s2[i, j] += acc[i - i0, j - j0] on the lower-triangle part (j <= i; j < i with `strict`) of rows [i0, i1) x
// columns [j0, j1); acc's row 0 / column 0 are those of the macro block (a0, b0).
PF_ALWAYS_INLINE void add_block_impl(const double* acc, int64_t a0, int64_t b0, int64_t i0, int64_t i1, int64_t j0,
                                     int64_t j1, double* s2, int64_t d, bool strict) {
  for (int64_t i = i0; i < i1; ++i) {
    double* __restrict out = s2 + i * d;
    const double* __restrict src = acc + (i - a0) * kMacro - b0;
    const int64_t jend = std::min(j1, strict ? i : i + 1);
    for (int64_t j = j0; j < jend; ++j) out[j] += src[j];
  }
}

// dst[j] = x[j] - c[j] in float32 (exact or correctly rounded, as in pack_row_impl), s1_local[j] += v and
// sq_local[j] += v * v, both in float64 (the products of float32 values are exact in float64): the prepass of the
// BLAS path (shift_cpu), whose GEMMs then read dst.
template <typename T, typename Convert>
PF_ALWAYS_INLINE void shift_row_impl(const T* xr, int64_t d, int64_t sd, const float* cshift, float* dst,
                                     double* s1_local, double* sq_local, float* row, Convert convert) {
  const float* src = row_as_float(xr, d, sd, row, convert);
  const float* __restrict s = src;
  const float* __restrict c = cshift;
  float* __restrict out = dst;
  double* __restrict a1 = s1_local;
  double* __restrict a2 = sq_local;
  for (int64_t j = 0; j < d; ++j) {
    const float v = s[j] - c[j];
    out[j] = v;
    const double w = static_cast<double>(v);
    a1[j] += w;
    a2[j] += w * w;
  }
}

// The row i of x = [b_0 | ... | b_{nb-1}] (column blocks of one dtype, each with its own strides) as d contiguous
// float32 in `row`: the engine's input when the caller hands it the K members' activations separately (no (N, D)
// concatenation; the row passes through L1 on its way to the packed panels).
template <typename T, typename Convert>
PF_ALWAYS_INLINE void gather_row_impl(const BlockRows<T>& src, int64_t i, float* row, Convert convert) {
  float* dst = row;
  for (int64_t b = 0; b < src.nb; ++b) {
    const int64_t c = src.cols[b];
    const float* s = row_as_float(src.x[b] + i * src.sn[b], c, src.sd[b], dst, convert);
    if (s != dst) std::memcpy(dst, s, static_cast<size_t>(c) * sizeof(float));
    dst += c;
  }
}

inline void no_convert(const float*, int64_t, float*) {}

// One instruction-set variant: tile shape, micro-kernel, and the packing / state-update loops compiled for the same
// instruction set. They are functions of their own (not inlined into the driver) because GCC does not give the
// body of an OpenMP parallel region the target attribute of the function around it: there they ran as SSE2 code
// (15% of the time at D = 1024, N = 4096 in a perf profile).
#define PF_VARIANT(NAME, TARGET, MR_, NR_, KERNEL, CVT_HALF, CVT_BF16)                                            \
  struct NAME {                                                                                                  \
    static constexpr int MR = MR_, NR = NR_;                                                                     \
    TARGET static void kernel(int64_t K, const float* a, const float* b, double* c, int64_t ldc, int cols) {      \
      KERNEL(K, a, b, c, ldc, cols);                                                                             \
    }                                                                                                            \
    TARGET static void pack_row(const float* xr, int64_t d, int64_t sd, const float* cs, float* p, int64_t ps,    \
                                int64_t k, double* s1, float* row) {                                             \
      pack_row_impl(xr, d, sd, cs, p, ps, k, s1, row, no_convert);                                               \
    }                                                                                                            \
    TARGET static void pack_row(const Half* xr, int64_t d, int64_t sd, const float* cs, float* p, int64_t ps,     \
                                int64_t k, double* s1, float* row) {                                             \
      pack_row_impl(xr, d, sd, cs, p, ps, k, s1, row, CVT_HALF);                                                 \
    }                                                                                                            \
    TARGET static void pack_row(const BHalf* xr, int64_t d, int64_t sd, const float* cs, float* p, int64_t ps,    \
                                int64_t k, double* s1, float* row) {                                             \
      pack_row_impl(xr, d, sd, cs, p, ps, k, s1, row, CVT_BF16);                                                 \
    }                                                                                                            \
    TARGET static void pack_row_blocks(const BlockRows<float>& b, int64_t i, int64_t d, const float* cs, float* p, \
                                       int64_t ps, int64_t k, double* s1, float* row) {                          \
      gather_row_impl(b, i, row, no_convert);                                                                    \
      pack_row_impl(static_cast<const float*>(row), d, 1, cs, p, ps, k, s1, row, no_convert);                    \
    }                                                                                                            \
    TARGET static void pack_row_blocks(const BlockRows<Half>& b, int64_t i, int64_t d, const float* cs, float* p,  \
                                       int64_t ps, int64_t k, double* s1, float* row) {                          \
      gather_row_impl(b, i, row, CVT_HALF);                                                                      \
      pack_row_impl(static_cast<const float*>(row), d, 1, cs, p, ps, k, s1, row, no_convert);                    \
    }                                                                                                            \
    TARGET static void pack_row_blocks(const BlockRows<BHalf>& b, int64_t i, int64_t d, const float* cs, float* p, \
                                       int64_t ps, int64_t k, double* s1, float* row) {                          \
      gather_row_impl(b, i, row, CVT_BF16);                                                                      \
      pack_row_impl(static_cast<const float*>(row), d, 1, cs, p, ps, k, s1, row, no_convert);                    \
    }                                                                                                            \
    TARGET static void add_block(const double* acc, int64_t a0, int64_t b0, int64_t i0, int64_t i1, int64_t j0,   \
                                 int64_t j1, double* s2, int64_t d, bool strict) {                               \
      add_block_impl(acc, a0, b0, i0, i1, j0, j1, s2, d, strict);                                                \
    }                                                                                                            \
    TARGET static void shift_row(const float* xr, int64_t d, int64_t sd, const float* cs, float* o, double* s1,   \
                                 double* sq, float* row) {                                                       \
      shift_row_impl(xr, d, sd, cs, o, s1, sq, row, no_convert);                                                 \
    }                                                                                                            \
    TARGET static void shift_row(const Half* xr, int64_t d, int64_t sd, const float* cs, float* o, double* s1,    \
                                 double* sq, float* row) {                                                       \
      shift_row_impl(xr, d, sd, cs, o, s1, sq, row, CVT_HALF);                                                   \
    }                                                                                                            \
    TARGET static void shift_row(const BHalf* xr, int64_t d, int64_t sd, const float* cs, float* o, double* s1,   \
                                 double* sq, float* row) {                                                       \
      shift_row_impl(xr, d, sd, cs, o, s1, sq, row, CVT_BF16);                                                   \
    }                                                                                                            \
  };

PF_VARIANT(VarScalar, , 4, 8, (kernel_scalar<4, 8>), convert_generic<Half>, convert_generic<BHalf>)
#ifdef PF_X86
PF_VARIANT(VarAvx512, __attribute__((target("avx512f"))), 8, 48, kernel_avx512, convert_half_avx512,
           convert_bf16_avx512)
PF_VARIANT(VarAvx2, __attribute__((target("avx2,fma,f16c"))), 6, 16, kernel_avx2, convert_half_avx2,
           convert_bf16_avx2)
#endif
#undef PF_VARIANT

template <typename V, typename T>
void run(const T* x, int64_t n, int64_t d, int64_t sn, int64_t sd, const double* shift, double* s1, double* s2,
         int threads, const std::vector<int64_t>& rects, const BlockRows<T>* parts) {
  constexpr int MR = V::MR, NR = V::NR;
  const int64_t npanels = (d + kPanelW - 1) / kPanelW;
  const int64_t nmacro = (d + kMacro - 1) / kMacro;
  // Lower-triangle macro blocks (bi >= bj); the dynamic schedule evens out the half-empty diagonal ones.
  // Rectangle mode (`rects` given, see accumulate_cpu): only the blocks meeting a rectangle, each clipped to the
  // bounding box of its intersections with the rectangles (tiles outside it are skipped, entries outside it and the
  // diagonal are not added), plus one diagonal job per macro row that runs only the tiles holding diagonal entries
  // and adds those entries: the same tiles as the full triangle's, so a restricted state equals the full state bit
  // for bit on what it holds (tests/test_stats_pairs.py). The diagonal blocks and the edges of a cross block that
  // does not start on the macro grid were 16% of the work of an MLP-1024 pair's cross block (D = 1024 + 1024); the
  // diagonal tiles are ~3%. Cross block of 512 rows x (1024 + 1024), 1 thread, AMD Zen 5: 186 -> 214 GFLOP/s.
  const bool rect_mode = !rects.empty();
  struct Job {
    int64_t i0, j0, ci0, ci1, cj0, cj1;  // macro block origin; rows [ci0, ci1) x columns [cj0, cj1) to compute
    bool diag;                           // the diagonal tiles of the macro rows [ci0, ci1) instead
  };
  std::vector<Job> blocks;
  blocks.reserve(static_cast<size_t>(nmacro * (nmacro + 3) / 2));
  for (int64_t bi = 0; bi < nmacro; ++bi) {
    const int64_t i0 = bi * kMacro, i1 = std::min(d, i0 + kMacro);
    if (rect_mode) blocks.push_back({i0, i0, i0, i1, i0, i1, true});
    for (int64_t bj = 0; bj <= bi; ++bj) {
      const int64_t j0 = bj * kMacro, j1 = std::min(d, j0 + kMacro);
      if (!rect_mode) {
        blocks.push_back({i0, j0, i0, i1, j0, j1, false});
        continue;
      }
      Job job{i0, j0, i1, i0, j1, j0, false};  // empty box, grown by each rectangle's intersection
      for (size_t r = 0; r + 3 < rects.size(); r += 4) {
        const int64_t a0 = std::max(i0, rects[r]), a1 = std::min(i1, rects[r + 1]);
        const int64_t b0 = std::max(j0, rects[r + 2]), b1 = std::min(j1, rects[r + 3]);
        if (a0 >= a1 || b0 >= b1) continue;
        job.ci0 = std::min(job.ci0, a0), job.ci1 = std::max(job.ci1, a1);
        job.cj0 = std::min(job.cj0, b0), job.cj1 = std::max(job.cj1, b1);
      }
      if (job.ci0 < job.ci1 && job.cj0 < job.cj1) blocks.push_back(job);
    }
  }
  const int64_t nblocks = static_cast<int64_t>(blocks.size());

  const int64_t dp = npanels * kPanelW;
  // Equal chunks (a last chunk of a few samples would still pay a whole pass of the macro accumulators over s2);
  // up to 1/8 above the cap rather than one more chunk (D = 2048, N = 4096: one chunk of 4096, not 4032 + 64).
  const int64_t cap = std::max(kDepth, std::min(kMaxChunk, kPackFloats / dp / kDepth * kDepth));
  int64_t nchunks = (n + cap - 1) / cap;
  if (nchunks > 1 && n <= (nchunks - 1) * (cap + cap / 8)) --nchunks;
  const int64_t chunk = std::min(n, ((n + nchunks - 1) / nchunks + kDepth - 1) / kDepth * kDepth);
  const int64_t pstride = chunk * kPanelW;  // floats from one panel to the next
  // The packed buffer is kept per calling thread between calls (up to 32 MiB): a fresh allocation page-faulted
  // ~1.5% of the time away at D = 1024, N = 4096. Only the padding columns of the last panel need zeros.
  thread_local Buffer<float> packed;
  thread_local int64_t packed_capacity = 0;
  if (packed_capacity < npanels * pstride) {
    packed.reset();
    packed_capacity = 0;
    packed = alloc_aligned<float>(npanels * pstride, "the packed samples");
    packed_capacity = npanels * pstride;
  }
  float* P = packed.get();
  if (d % kPanelW != 0) {
    float* last = P + (npanels - 1) * pstride;
    const int64_t used = d % kPanelW;
    for (int64_t k = 0; k < chunk; ++k) std::memset(last + k * kPanelW + used, 0, (kPanelW - used) * sizeof(float));
  }
  std::vector<float> cshift(static_cast<size_t>(d));
  for (int64_t j = 0; j < d; ++j) cshift[j] = static_cast<float>(shift[j]);
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, std::max(nblocks, n))));
  bool alloc_failed = false;

#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
  {
    std::vector<double> s1_local(static_cast<size_t>(d), 0.0);
    std::vector<float> row(static_cast<size_t>(d), 0.0f);
    double* acc = static_cast<double*>(std::aligned_alloc(64, kMacro * kMacro * sizeof(double)));
    if (acc == nullptr) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
      alloc_failed = true;
    }
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t K = std::min(chunk, n - r0);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t k = 0; k < K; ++k) {
        if (parts == nullptr)
          V::pack_row(x + (r0 + k) * sn, d, sd, cshift.data(), P, pstride, k, s1_local.data(), row.data());
        else
          V::pack_row_blocks(*parts, r0 + k, d, cshift.data(), P, pstride, k, s1_local.data(), row.data());
      }
      // implicit barrier: the chunk is packed
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t b = 0; b < nblocks; ++b) {
        if (acc == nullptr) continue;
        const Job& job = blocks[b];
        if (job.diag) {
          // the tiles (MR rows from ir, NR columns from jr) holding the diagonal entries of rows [ir, ir + MR), each
          // over the chunk in the same depth steps as in a macro block; acc as an MR x (2 NR) scratch
          constexpr int64_t ldc = 2 * NR;
          static_assert(MR * ldc <= kMacro * kMacro, "the diagonal scratch must fit the macro accumulator");
          for (int64_t ir = job.ci0; ir < job.ci1; ir += MR) {
            const int64_t jfirst = ir / NR * NR, rows = std::min<int64_t>(MR, job.ci1 - ir);
            std::memset(acc, 0, MR * ldc * sizeof(double));
            for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
              const int64_t kk = std::min(kDepth, K - k0);
              const float* ap = P + (ir / kPanelW) * pstride + k0 * kPanelW + (ir % kPanelW);
              for (int64_t jr = jfirst; jr < ir + MR; jr += NR) {
                const float* bp = P + (jr / kPanelW) * pstride + k0 * kPanelW + (jr % kPanelW);
                V::kernel(kk, ap, bp, acc + (jr - jfirst), ldc, static_cast<int>(std::min<int64_t>(NR, ir + MR - jr)));
              }
            }
            for (int64_t r = 0; r < rows; ++r) s2[(ir + r) * (d + 1)] += acc[r * ldc + (ir + r - jfirst)];
          }
          continue;
        }
        const int64_t i0 = job.i0, j0 = job.j0;
        // tiles on the block's own grid (rows from a multiple of MR, columns from a multiple of NR: the packed
        // operands' alignment), from the clip box's first row / column rounded down
        const int64_t it0 = i0 + (job.ci0 - i0) / MR * MR, jt0 = j0 + (job.cj0 - j0) / NR * NR;
        std::memset(acc, 0, kMacro * kMacro * sizeof(double));
        for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
          const int64_t kk = std::min(kDepth, K - k0);
          for (int64_t jr = jt0; jr < job.cj1; jr += NR) {
            const float* bp = P + (jr / kPanelW) * pstride + k0 * kPanelW + (jr % kPanelW);
            // First tile row reaching the diagonal: tiles entirely above it (ir + MR - 1 < jr) are skipped.
            const int64_t ir_first = std::max(it0, jr / MR * MR);
            for (int64_t ir = ir_first; ir < job.ci1; ir += MR) {
              const float* ap = P + (ir / kPanelW) * pstride + k0 * kPanelW + (ir % kPanelW);
              // Columns up to the tile's last row: those right of it lie above the diagonal (at D = 512 the full
              // 8 x 48 width wasted 9% of the work on them); and up to the clip box's last column.
              const int cols = static_cast<int>(std::min<int64_t>(std::min<int64_t>(NR, ir + MR - jr), job.cj1 - jr));
              V::kernel(kk, ap, bp, acc + (ir - i0) * kMacro + (jr - j0), kMacro, cols);
            }
          }
        }
        V::add_block(acc, i0, j0, job.ci0, job.ci1, job.cj0, job.cj1, s2, d, rect_mode);
      }  // implicit barrier before the next chunk overwrites the panels
    }
#ifdef _OPENMP
#pragma omp critical
#endif
    for (int64_t j = 0; j < d; ++j) s1[j] += s1_local[j];
    std::free(acc);
  }
  PF_CHECK(!alloc_failed, "correlation: could not allocate a thread's ", kMacro * kMacro * 8, "-byte accumulator");
}

// The prepass of the BLAS path: out (n x d, row-major float32) = x - c, s1 += sum_i (x_i - c) and
// sq[j * sq_stride] += sum_i (x_ij - c_j)^2, float64 (sq_stride = d + 1: the diagonal of a (d, d) s2). Memory-bound: one read of x, one write of out.
template <typename V, typename T>
void shift_run(const T* x, int64_t n, int64_t d, int64_t sn, int64_t sd, const double* shift, double* s1, double* sq,
               int64_t sq_stride, float* out, int threads) {
  std::vector<float> cshift(static_cast<size_t>(d));
  for (int64_t j = 0; j < d; ++j) cshift[j] = static_cast<float>(shift[j]);
  // a thread per 64 rows at least: the per-thread partials cost two passes over d
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / 64)));
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
  {
    std::vector<double> s1_local(static_cast<size_t>(d), 0.0), sq_local(static_cast<size_t>(d), 0.0);
    std::vector<float> row(static_cast<size_t>(d), 0.0f);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t i = 0; i < n; ++i)
      V::shift_row(x + i * sn, d, sd, cshift.data(), out + i * d, s1_local.data(), sq_local.data(), row.data());
#ifdef _OPENMP
#pragma omp critical
#endif
    for (int64_t j = 0; j < d; ++j) {
      s1[j] += s1_local[j];
      sq[j * sq_stride] += sq_local[j];
    }
  }
}

template <typename T>
std::string dispatch_shift(const T* x, int64_t n, int64_t d, int64_t sn, int64_t sd, const double* shift, double* s1,
                           double* sq, int64_t sq_stride, float* out, int threads) {
#ifdef PF_X86
  const std::string best = best_isa();
  if (best == "avx512") {
    shift_run<VarAvx512, T>(x, n, d, sn, sd, shift, s1, sq, sq_stride, out, threads);
    return best;
  }
  if (best == "avx2") {
    shift_run<VarAvx2, T>(x, n, d, sn, sd, shift, s1, sq, sq_stride, out, threads);
    return best;
  }
#endif
  shift_run<VarScalar, T>(x, n, d, sn, sd, shift, s1, sq, sq_stride, out, threads);
  return "scalar";
}

template <typename T>
std::string dispatch_isa(const T* x, int64_t n, int64_t d, int64_t sn, int64_t sd, const double* shift, double* s1,
                         double* s2, int threads, Isa isa, const std::vector<int64_t>& rects,
                         const BlockRows<T>* parts = nullptr) {
  if (isa == Isa::kAuto) {
    const std::string best = best_isa();
    isa = best == "avx512" ? Isa::kAvx512 : best == "avx2" ? Isa::kAvx2 : Isa::kScalar;
  }
#ifdef PF_X86
  if (isa == Isa::kAvx512) {
    PF_CHECK(__builtin_cpu_supports("avx512f"), "correlation: isa='avx512' requested but this CPU lacks AVX-512F");
    run<VarAvx512, T>(x, n, d, sn, sd, shift, s1, s2, threads, rects, parts);
    return "avx512";
  }
  if (isa == Isa::kAvx2) {
    PF_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"),
             "correlation: isa='avx2' requested but this CPU lacks AVX2/FMA/F16C");
    run<VarAvx2, T>(x, n, d, sn, sd, shift, s1, s2, threads, rects, parts);
    return "avx2";
  }
#else
  PF_CHECK(isa == Isa::kScalar, "correlation: SIMD micro-kernels exist only on x86-64; use isa='scalar'");
#endif
  run<VarScalar, T>(x, n, d, sn, sd, shift, s1, s2, threads, rects, parts);
  return "scalar";
}

void check_rects(const std::vector<int64_t>& rects, int64_t d) {
  PF_CHECK(rects.size() % 4 == 0, "correlation: rects must hold 4 integers per rectangle; got ", rects.size());
  for (size_t r = 0; r < rects.size(); r += 4)
    PF_CHECK(0 <= rects[r] && rects[r] <= rects[r + 1] && rects[r + 1] <= d && 0 <= rects[r + 2] &&
                 rects[r + 2] <= rects[r + 3] && rects[r + 3] <= d,
             "correlation: rectangle ", r / 4, " = [", rects[r], ", ", rects[r + 1], ") x [", rects[r + 2], ", ",
             rects[r + 3], ") is not inside [0, ", d, ")^2");
}

}  // namespace

std::string best_isa() {
#ifdef PF_X86
  if (__builtin_cpu_supports("avx512f")) return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return "avx2";
#endif
  return "scalar";
}

std::string accumulate_cpu(const void* x, DType dtype, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d,
                           const double* shift, double* s1, double* s2, int threads, Isa isa,
                           const std::vector<int64_t>& rects) {
  PF_CHECK(n >= 0 && d >= 0, "correlation: x must have non-negative shape (n, d); got (", n, ", ", d, ")");
  check_rects(rects, d);
  if (n == 0 || d == 0) return best_isa();
  PF_CHECK(x != nullptr && shift != nullptr && s1 != nullptr && s2 != nullptr, "correlation: null buffer pointer");
  const int t = resolve_threads(threads);
  switch (dtype) {
    case DType::kFloat32:
      return dispatch_isa(static_cast<const float*>(x), n, d, stride_n, stride_d, shift, s1, s2, t, isa, rects);
    case DType::kFloat16:
      return dispatch_isa(static_cast<const Half*>(x), n, d, stride_n, stride_d, shift, s1, s2, t, isa, rects);
    case DType::kBFloat16:
      return dispatch_isa(static_cast<const BHalf*>(x), n, d, stride_n, stride_d, shift, s1, s2, t, isa, rects);
  }
  fail("correlation: unknown dtype code ", static_cast<int>(dtype), " (expected 0=float32, 1=float16, 2=bfloat16)");
}

std::string accumulate_blocks_cpu(const std::vector<uintptr_t>& xs, DType dtype, int64_t n,
                                  const std::vector<int64_t>& cols, const std::vector<int64_t>& stride_n,
                                  const std::vector<int64_t>& stride_d, const double* shift, double* s1, double* s2,
                                  int threads, Isa isa, const std::vector<int64_t>& rects) {
  const size_t nb = xs.size();
  PF_CHECK(nb > 0 && cols.size() == nb && stride_n.size() == nb && stride_d.size() == nb,
           "correlation: blocks need one address, column count and stride pair each; got ", nb, " addresses, ",
           cols.size(), " column counts, ", stride_n.size(), " and ", stride_d.size(), " strides");
  int64_t d = 0;
  for (size_t b = 0; b < nb; ++b) {
    PF_CHECK(cols[b] >= 0 && stride_n[b] >= 0 && stride_d[b] >= 0, "correlation: block ", b,
             " must have non-negative columns and strides; got ", cols[b], " columns, strides (", stride_n[b], ", ",
             stride_d[b], ")");
    PF_CHECK(xs[b] != 0 || cols[b] == 0 || n == 0, "correlation: block ", b, " has a null address");
    d += cols[b];
  }
  auto go = [&](auto tag) -> std::string {
    using T = std::remove_pointer_t<decltype(tag)>;
    std::vector<const T*> ptrs(nb);
    for (size_t b = 0; b < nb; ++b) ptrs[b] = reinterpret_cast<const T*>(xs[b]);
    const BlockRows<T> src{static_cast<int64_t>(nb), ptrs.data(), cols.data(), stride_n.data(), stride_d.data()};
    PF_CHECK(n >= 0, "correlation: the blocks must have a non-negative row count; got ", n);
    check_rects(rects, d);
    if (n == 0 || d == 0) return best_isa();
    PF_CHECK(shift != nullptr && s1 != nullptr && s2 != nullptr, "correlation: null buffer pointer");
    return dispatch_isa<T>(nullptr, n, d, 0, 0, shift, s1, s2, resolve_threads(threads), isa, rects, &src);
  };
  switch (dtype) {
    case DType::kFloat32:
      return go(static_cast<float*>(nullptr));
    case DType::kFloat16:
      return go(static_cast<Half*>(nullptr));
    case DType::kBFloat16:
      return go(static_cast<BHalf*>(nullptr));
  }
  fail("correlation: unknown dtype code ", static_cast<int>(dtype), " (expected 0=float32, 1=float16, 2=bfloat16)");
}

std::string cpu_vendor() {
#ifdef PF_X86
  if (__builtin_cpu_is("intel")) return "intel";
  if (__builtin_cpu_is("amd")) return "amd";
#endif
  return "other";
}

std::string shift_cpu(const void* x, DType dtype, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d,
                      const double* shift, double* s1, double* sq, int64_t sq_stride, float* out, int threads) {
  PF_CHECK(n >= 0 && d >= 0, "correlation: x must have non-negative shape (n, d); got (", n, ", ", d, ")");
  if (n == 0 || d == 0) return best_isa();
  PF_CHECK(x != nullptr && shift != nullptr && s1 != nullptr && sq != nullptr && out != nullptr,
           "correlation: null buffer pointer");
  const int t = resolve_threads(threads);
  switch (dtype) {
    case DType::kFloat32:
      return dispatch_shift(static_cast<const float*>(x), n, d, stride_n, stride_d, shift, s1, sq, sq_stride, out, t);
    case DType::kFloat16:
      return dispatch_shift(static_cast<const Half*>(x), n, d, stride_n, stride_d, shift, s1, sq, sq_stride, out, t);
    case DType::kBFloat16:
      return dispatch_shift(static_cast<const BHalf*>(x), n, d, stride_n, stride_d, shift, s1, sq, sq_stride, out, t);
  }
  fail("correlation: unknown dtype code ", static_cast<int>(dtype), " (expected 0=float32, 1=float16, 2=bfloat16)");
}

void add_f32_cpu(double* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows, int64_t cols,
                 int threads) {
  PF_CHECK(rows >= 0 && cols >= 0, "correlation: add_f32 needs a non-negative shape; got (", rows, ", ", cols, ")");
  if (rows == 0 || cols == 0) return;
  PF_CHECK(dst != nullptr && src != nullptr, "correlation: null buffer pointer");
  const int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(resolve_threads(threads), rows / 64)));
#ifdef _OPENMP
#pragma omp parallel for num_threads(t) if (t > 1) schedule(static)
#endif
  for (int64_t i = 0; i < rows; ++i) {
    double* __restrict o = dst + i * ld_dst;
    const float* __restrict r = src + i * ld_src;
    for (int64_t j = 0; j < cols; ++j) o[j] += static_cast<double>(r[j]);
  }
}

}  // namespace correlation
}  // namespace pyfusion
