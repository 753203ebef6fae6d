// CPU kernel of the correlation engine: lower triangle of sum_n (x_n - c)(x_n - c)^T at GEMM speed.
//
// Scheme (a SYRK in the BLIS style, specialised for float64 accumulation of float32 products):
//   * the rows are taken in panels of P samples; each panel is shifted by c (in float64), rounded to float32
//     and packed twice: as MR-wide micro-panels ("A", broadcast operand) and NR-wide ones ("B", vector operand);
//   * a register-blocked micro-kernel computes an MR x NR tile of the panel's Gram in float32 over the P
//     samples, and the tile is added to the float64 state. Float32 sums run over at most P = 256 shifted
//     products only, so the relative error of the state stays ~1e-7 whatever N;
//   * only tiles that touch the lower triangle are computed (half the flops of X^T X);
//   * the A operand is processed in chunks of MC rows that stay in L2, the B micro-panel (P x NR) stays in
//     L1 while the chunk's A micro-panels stream past it; OpenMP splits the B micro-panels (dynamic schedule,
//     since the triangle gives them unequal work).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PF_X86 1
#endif

#include "common.h"
#include "correlation/correlation.h"

namespace pyfusion {
namespace correlation {
namespace {

// Samples per panel. Float32 partial sums run over P products; 256 keeps the B micro-panel of the AVX-512
// kernel (256 x 32 floats = 32 KiB) in the 48 KiB L1 of Zen 4 next to the A stream (chosen from the cache
// sizes, not tuned: with P=256 the kernel ran D=2048, N=65536 on one idle core in 1.46 s, ~190 GFLOP/s of
// useful triangle work, against 5.06 s for torch's float32 X^T X).
constexpr int64_t kPanel = 256;
// Rows of the A operand kept in L2 at once: 480 rows x 256 samples x 4 B = 480 KiB of the 1 MiB L2.
constexpr int64_t kChunkRows = 480;

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using FloatBuffer = std::unique_ptr<float[], AlignedFree>;

FloatBuffer alloc_floats(int64_t count) {
  size_t bytes = static_cast<size_t>(count) * sizeof(float);
  bytes = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
  PF_CHECK(p != nullptr, "correlation: could not allocate ", bytes, " bytes for the packed panels");
  std::memset(p, 0, bytes == 0 ? 64 : bytes);
  return FloatBuffer(static_cast<float*>(p));
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

// Float32 register sums are flushed into the float64 tile every kFlush samples. Measured max relative covariance
// error, N=1000, D=97, offset data: 1.7e-6 with 256-long float32 chains, 6e-7 to 8e-7 with 64-long ones. The
// cost was lost in the noise of the shared VM (1.46 s -> 1.70 s at D=2048 between two loaded runs).
constexpr int64_t kFlush = 64;

using MicroKernel = void (*)(int64_t k, const float* a, const float* b, double* c);

// ---- micro-kernels: c[r * NR + j] += sum_k a[k * MR + r] * b[k * NR + j] (c: float64) ----------------

template <int MR, int NR>
void kernel_scalar(int64_t K, const float* a, const float* b, double* c) {
  for (int64_t k0 = 0; k0 < K; k0 += kFlush) {
    const int64_t k1 = std::min(K, k0 + kFlush);
    float acc[MR][NR] = {};
    for (int64_t k = k0; k < k1; ++k) {
      for (int r = 0; r < MR; ++r) {
        const float ar = a[k * MR + r];
        for (int j = 0; j < NR; ++j) acc[r][j] += ar * b[k * NR + j];
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) c[r * NR + j] += acc[r][j];
  }
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

// 12 x 32 tile: 24 zmm accumulators, 2 vector loads and 12 broadcasts per 24 FMAs.
__attribute__((target("avx512f"))) void kernel_avx512(int64_t K, const float* a, const float* b, double* c) {
  constexpr int MR = 12;
  for (int64_t k0 = 0; k0 < K; k0 += kFlush) {
  const int64_t k1 = std::min(K, k0 + kFlush);
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
  for (int64_t k = k0; k < k1; ++k) {
    const __m512 b0 = _mm512_load_ps(b + k * 32);
    const __m512 b1 = _mm512_load_ps(b + k * 32 + 16);
    const float* ak = a + k * MR;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(ak[r]);
      acc0[r] = _mm512_fmadd_ps(ar, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(ar, b1, acc1[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    add16(c + r * 32, acc0[r]);
    add16(c + r * 32 + 16, acc1[r]);
  }
  }
}

// 6 x 16 tile: 12 ymm accumulators (the classic Haswell/Zen 2 shape).
__attribute__((target("avx2,fma"))) void kernel_avx2(int64_t K, const float* a, const float* b, double* c) {
  constexpr int MR = 6;
  for (int64_t k0 = 0; k0 < K; k0 += kFlush) {
  const int64_t k1 = std::min(K, k0 + kFlush);
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm256_setzero_ps();
    acc1[r] = _mm256_setzero_ps();
  }
  for (int64_t k = k0; k < k1; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * 16);
    const __m256 b1 = _mm256_load_ps(b + k * 16 + 8);
    const float* ak = a + k * MR;
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_broadcast_ss(ak + r);
      acc0[r] = _mm256_fmadd_ps(ar, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(ar, b1, acc1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    add8(c + r * 16, acc0[r]);
    add8(c + r * 16 + 8, acc1[r]);
  }
  }
}
#endif

constexpr int64_t gcd64(int64_t a, int64_t b) { return b == 0 ? a : gcd64(b, a % b); }

// One full pass over the rows for a given tile shape.
template <typename T, int MR, int NR>
void run(const T* x, int64_t n, int64_t d, int64_t sn, int64_t sd, const double* shift, double* s1, double* s2,
         int threads, MicroKernel kernel) {
  constexpr int64_t unit = MR / gcd64(MR, NR) * NR;  // lcm: packing chunks cover whole A and B micro-panels
  const int64_t dp = (d + unit - 1) / unit * unit;
  const int64_t nib = dp / MR, njb = dp / NR;
  const int64_t nib_valid = (d + MR - 1) / MR, njb_valid = (d + NR - 1) / NR;
  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkRows / MR);
  FloatBuffer apack = alloc_floats(kPanel * dp);  // nib micro-panels of kPanel x MR
  FloatBuffer bpack = alloc_floats(kPanel * dp);  // njb micro-panels of kPanel x NR
  (void)nib;
  (void)njb;
  std::vector<float> cshift(d);
  for (int64_t j = 0; j < d; ++j) cshift[j] = static_cast<float>(shift[j]);
  float* A = apack.get();
  float* B = bpack.get();

#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
    std::vector<float> row(dp, 0.0f);  // padded columns stay zero
    std::vector<double> s1_local(d, 0.0);
    alignas(64) double tile[MR * NR];
    for (int64_t r0 = 0; r0 < n; r0 += kPanel) {
      const int64_t K = std::min(kPanel, n - r0);
      // Pack: threads split the panel's rows; v = x - c is formed in float32, which is exact (Sterbenz) or
      // correctly rounded because the caller passes a float32-representable shift c. Each thread sums its rows
      // of v into a float64 partial of s1 (a float32 panel sum lost 5e-7 relative accuracy in s1, which the raw
      // Gram multiplies by the offset c).
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t k = 0; k < K; ++k) {
        const T* xr = x + (r0 + k) * sn;
        for (int64_t j = 0; j < d; ++j) {
          const float v = load<T>(xr + j * sd) - cshift[j];
          row[j] = v;
          s1_local[j] += static_cast<double>(v);
        }
        for (int64_t q = 0; q < nib_valid; ++q)
          std::memcpy(A + q * kPanel * MR + k * MR, row.data() + q * MR, MR * sizeof(float));
        for (int64_t q = 0; q < njb_valid; ++q)
          std::memcpy(B + q * kPanel * NR + k * NR, row.data() + q * NR, NR * sizeof(float));
      }  // implicit barrier: the panel is packed
      for (int64_t ic = 0; ic < nib_valid; ic += chunk_blocks) {
        const int64_t ic_end = std::min(nib_valid, ic + chunk_blocks);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t jb = 0; jb < njb_valid; ++jb) {
          const int64_t j0 = jb * NR;
          const int64_t jn = std::min<int64_t>(NR, d - j0);
          const int64_t ib_first = std::max(ic, j0 / MR);  // first MR block reaching row j0 (lower triangle)
          for (int64_t ib = ib_first; ib < ic_end; ++ib) {
            std::fill(tile, tile + MR * NR, 0.0);
            kernel(K, A + ib * kPanel * MR, B + jb * kPanel * NR, tile);
            const int64_t i0 = ib * MR;
            const int64_t in = std::min<int64_t>(MR, d - i0);
            for (int64_t r = 0; r < in; ++r) {
              double* out = s2 + (i0 + r) * d + j0;
              const double* t = tile + r * NR;
              for (int64_t j = 0; j < jn; ++j) out[j] += t[j];
            }
          }
        }  // implicit barrier before the next chunk / panel overwrites the packs
      }
    }
#ifdef _OPENMP
#pragma omp critical
#endif
    for (int64_t j = 0; j < d; ++j) s1[j] += s1_local[j];
  }
}

// Rows per thread below which the threads share tiles of one panel (run) instead of taking row ranges.
constexpr int64_t kSplitRows = 4 * kPanel;

// Large batches: each thread takes a contiguous range of whole panels into a private state (thread 0 into the
// caller's), then the lower triangles are summed. One join instead of two barriers per panel: on the shared,
// loaded 2-core VM the tile-parallel version once took 0.36 s at D=256, N=65536 on 2 threads against 0.045 s on
// one (each barrier waits for a descheduled thread). Extra memory: (threads - 1) * d * d doubles.
template <typename T, int MR, int NR>
void run_split(const T* x, int64_t n, int64_t d, int64_t sn, int64_t sd, const double* shift, double* s1,
               double* s2, int threads, MicroKernel kernel) {
  if (threads <= 1 || n < threads * kSplitRows) {
    run<T, MR, NR>(x, n, d, sn, sd, shift, s1, s2, threads, kernel);
    return;
  }
  std::vector<double*> part2(threads, nullptr);
  std::vector<std::vector<double>> part1(threads);
  bool alloc_failed = false;
  const int64_t panels = (n + kPanel - 1) / kPanel;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int t = 0, nt = 1;
#endif
    const int64_t r0 = panels * t / nt * kPanel;
    const int64_t r1 = std::min(n, panels * (t + 1) / nt * kPanel);
    double* my2 = s2;
    double* my1 = s1;
    if (t > 0) {
      // calloc: zero pages are touched first by their owning thread.
      part2[t] = static_cast<double*>(std::calloc(static_cast<size_t>(d) * d, sizeof(double)));
      part1[t].assign(d, 0.0);
      my2 = part2[t];
      my1 = part1[t].data();
    }
    if (my2 == nullptr) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
      alloc_failed = true;
    } else if (r1 > r0) {
      run<T, MR, NR>(x + r0 * sn, r1 - r0, d, sn, sd, shift, my1, my2, 1, kernel);
    }
#ifdef _OPENMP
#pragma omp barrier
#endif
    if (!alloc_failed) {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
      for (int64_t i = 0; i < d; ++i) {
        for (int q = 1; q < nt; ++q) {
          const double* src = part2[q] + i * d;
          double* dst = s2 + i * d;
          for (int64_t j = 0; j <= i; ++j) dst[j] += src[j];
          s1[i] += part1[q][i];
        }
      }
    }
  }
  for (double* p : part2) std::free(p);
  PF_CHECK(!alloc_failed, "correlation: could not allocate ", d * d * 8, " bytes for a thread's partial state");
}

template <typename T>
std::string dispatch_isa(const T* x, int64_t n, int64_t d, int64_t sn, int64_t sd, const double* shift, double* s1,
                         double* s2, int threads, Isa isa) {
  if (isa == Isa::kAuto) {
    const std::string best = best_isa();
    isa = best == "avx512" ? Isa::kAvx512 : best == "avx2" ? Isa::kAvx2 : Isa::kScalar;
  }
#ifdef PF_X86
  if (isa == Isa::kAvx512) {
    PF_CHECK(__builtin_cpu_supports("avx512f"), "correlation: isa='avx512' requested but this CPU lacks AVX-512F");
    run_split<T, 12, 32>(x, n, d, sn, sd, shift, s1, s2, threads, kernel_avx512);
    return "avx512";
  }
  if (isa == Isa::kAvx2) {
    PF_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
             "correlation: isa='avx2' requested but this CPU lacks AVX2/FMA");
    run_split<T, 6, 16>(x, n, d, sn, sd, shift, s1, s2, threads, kernel_avx2);
    return "avx2";
  }
#else
  PF_CHECK(isa == Isa::kScalar, "correlation: SIMD micro-kernels exist only on x86-64; use isa='scalar'");
#endif
  run_split<T, 4, 8>(x, n, d, sn, sd, shift, s1, s2, threads, kernel_scalar<4, 8>);
  return "scalar";
}

}  // namespace

std::string best_isa() {
#ifdef PF_X86
  if (__builtin_cpu_supports("avx512f")) return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
#endif
  return "scalar";
}

std::string accumulate_cpu(const void* x, DType dtype, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d,
                           const double* shift, double* s1, double* s2, int threads, Isa isa) {
  PF_CHECK(n >= 0 && d >= 0, "correlation: x must have non-negative shape (n, d); got (", n, ", ", d, ")");
  if (n == 0 || d == 0) return best_isa();
  PF_CHECK(x != nullptr && shift != nullptr && s1 != nullptr && s2 != nullptr, "correlation: null buffer pointer");
  const int t = resolve_threads(threads);
  switch (dtype) {
    case DType::kFloat32:
      return dispatch_isa(static_cast<const float*>(x), n, d, stride_n, stride_d, shift, s1, s2, t, isa);
    case DType::kFloat16:
      return dispatch_isa(static_cast<const Half*>(x), n, d, stride_n, stride_d, shift, s1, s2, t, isa);
    case DType::kBFloat16:
      return dispatch_isa(static_cast<const BHalf*>(x), n, d, stride_n, stride_d, shift, s1, s2, t, isa);
  }
  fail("correlation: unknown dtype code ", static_cast<int>(dtype), " (expected 0=float32, 1=float16, 2=bfloat16)");
}

}  // namespace correlation
}  // namespace pyfusion
