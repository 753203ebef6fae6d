// See gemm.h. Why: the squared-distance GEMMs of partial fusion's weight costs are most of a VGG11 pair's fusion
// (512 x 512 x 3456 float64 per deep layer), and torch's MKL runs its AVX2 kernel on AMD CPUs: 62 GFLOPS on one
// core of an AMD EPYC (Zen 5) VM, where OpenBLAS's AVX-512 kernel (forced by its environment variable, which a
// library cannot set for its user) reaches 100.
#include "gemm/gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PF_GEMM_AVX512 1
#include <immintrin.h>
#endif

#include "common.h"

namespace pyfusion::gemm {

namespace {

constexpr int64_t kMr = 8;    // rows of C per micro-tile (broadcast from the packed A sliver)
constexpr int64_t kNr = 24;   // columns of C per micro-tile (3 zmm)
constexpr int64_t kKc = 192;  // depth per packed panel: the B sliver (24 x 192 x 8 B = 36 KB) stays in L1
constexpr int64_t kMc = 144;  // rows of A per packed block (144 x 192 x 8 B = 216 KB, L2)

// sq (optional): each packed row's sum of squares over the panel, in k order, added to sq[row] (set on panel 0)
inline void sum_squares(const double* src, int64_t kc, double* sq, int64_t row, bool first) {
  double acc = 0.0;
  for (int64_t kk = 0; kk < kc; ++kk) acc += src[kk] * src[kk];
  sq[row] = first ? acc : sq[row] + acc;
}

// rows [row0, row0 + rows_total) of x, depth [p0, p0 + kc), into slivers of R rows, k-major: xp[s][kk][r]; rows past
// the end are 0. R full rows are read together so that the writes are sequential (512 x 512 x 3456: 16.9 -> 16.3 ms
// against packing one row at a time with writes R apart)
template <int64_t R>
void pack_rows(const double* x, int64_t ldx, int64_t row0, int64_t rows_total, int64_t p0, int64_t kc, double* xp,
               double* sq) {
  for (int64_t s = 0; s < rows_total; s += R) {
    const int64_t rows = std::min(R, rows_total - s);
    double* dst = xp + s * kc;
    if (rows == R) {
      const double* src[R];
      for (int64_t r = 0; r < R; ++r) src[r] = x + (row0 + s + r) * ldx + p0;
      for (int64_t kk = 0; kk < kc; ++kk)
        for (int64_t r = 0; r < R; ++r) dst[kk * R + r] = src[r][kk];
    } else {
      for (int64_t r = 0; r < R; ++r) {
        const double* src = x + (row0 + s + r) * ldx + p0;
        for (int64_t kk = 0; kk < kc; ++kk) dst[kk * R + r] = r < rows ? src[kk] : 0.0;
      }
    }
    if (sq != nullptr)
      for (int64_t r = 0; r < rows; ++r) sum_squares(x + (row0 + s + r) * ldx + p0, kc, sq, row0 + s + r, p0 == 0);
  }
}

// A block (mc rows from i0) into slivers of kMr rows; B panel (all n rows) into slivers of kNr rows of B (columns of C)
void pack_a(const double* a, int64_t lda, int64_t i0, int64_t mc, int64_t p0, int64_t kc, double* ap, double* sq) {
  pack_rows<kMr>(a, lda, i0, mc, p0, kc, ap, sq);
}

void pack_b(const double* b, int64_t ldb, int64_t n, int64_t p0, int64_t kc, double* bp, double* sq) {
  pack_rows<kNr>(b, ldb, 0, n, p0, kc, bp, sq);
}

#ifdef PF_GEMM_AVX512
// one kMr x kNr tile: acc = sum_kk ap[kk] (x) bp[kk]; then c = acc (first panel) or c + acc, for rows x cols
__attribute__((target("avx512f"))) void micro(const double* ap, const double* bp, int64_t kc, double* c,
                                              int64_t ldc, int64_t rows, int64_t cols, bool first) {
  __m512d acc[kMr][3];
  for (int r = 0; r < kMr; ++r)
    for (int v = 0; v < 3; ++v) acc[r][v] = _mm512_setzero_pd();
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m512d b0 = _mm512_loadu_pd(bp), b1 = _mm512_loadu_pd(bp + 8), b2 = _mm512_loadu_pd(bp + 16);
    for (int r = 0; r < kMr; ++r) {
      const __m512d x = _mm512_set1_pd(ap[r]);
      acc[r][0] = _mm512_fmadd_pd(x, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_pd(x, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_pd(x, b2, acc[r][2]);
    }
    ap += kMr;
    bp += kNr;
  }
  if (rows == kMr && cols == kNr) {
    for (int r = 0; r < kMr; ++r) {
      double* cr = c + r * ldc;
      for (int v = 0; v < 3; ++v) {
        const __m512d o = first ? acc[r][v] : _mm512_add_pd(_mm512_loadu_pd(cr + 8 * v), acc[r][v]);
        _mm512_storeu_pd(cr + 8 * v, o);
      }
    }
    return;
  }
  alignas(64) double tile[kMr * kNr];
  for (int r = 0; r < kMr; ++r)
    for (int v = 0; v < 3; ++v) _mm512_store_pd(tile + r * kNr + 8 * v, acc[r][v]);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < cols; ++q) c[r * ldc + q] = first ? tile[r * kNr + q] : c[r * ldc + q] + tile[r * kNr + q];
}
#endif

}  // namespace

bool abt_f64_supported() {
#ifdef PF_GEMM_AVX512
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

void abt_f64(const double* a, const double* b, double* c, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
             int64_t ldc, int threads, double* sq_a, double* sq_b) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, sizeof(double) * n);
    if (sq_a != nullptr) std::memset(sq_a, 0, sizeof(double) * m);
    if (sq_b != nullptr) std::memset(sq_b, 0, sizeof(double) * n);
    return;
  }
#ifdef PF_GEMM_AVX512
  const int64_t n_pad = (n + kNr - 1) / kNr * kNr;
  std::vector<double> bp(static_cast<size_t>(n_pad * kKc));
  const int64_t blocks = (m + kMc - 1) / kMc;
  const int nt = static_cast<int>(std::min<int64_t>(resolve_threads(threads), blocks));
  std::vector<std::vector<double>> ap(static_cast<size_t>(std::max(nt, 1)));
  for (int64_t p0 = 0; p0 < k; p0 += kKc) {  // depth panels in order: every entry sums its panels in k order
    const int64_t kc = std::min(kKc, k - p0);
    pack_b(b, ldb, n, p0, kc, bp.data(), sq_b);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (int64_t blk = 0; blk < blocks; ++blk) {  // row blocks of C are independent: the result is thread-free
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num();
#endif
      std::vector<double>& buf = ap[static_cast<size_t>(tid)];
      if (buf.empty()) buf.resize(static_cast<size_t>((kMc + kMr) * kKc));
      const int64_t i0 = blk * kMc, mc = std::min(kMc, m - i0);
      pack_a(a, lda, i0, mc, p0, kc, buf.data(), sq_a);
      for (int64_t j = 0; j < n; j += kNr) {
        const double* bs = bp.data() + j * kc;
        for (int64_t s = 0; s < mc; s += kMr) {
          micro(buf.data() + s * kc, bs, kc, c + (i0 + s) * ldc + j, ldc, std::min(kMr, mc - s),
                std::min(kNr, n - j), p0 == 0);
        }
      }
    }
  }
#else
  (void)a;
  (void)b;
  (void)c;
  (void)lda;
  (void)ldb;
  (void)threads;
  (void)sq_a;
  (void)sq_b;
#endif
}

}  // namespace pyfusion::gemm
