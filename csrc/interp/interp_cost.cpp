// CPU cost epilogue of HF (see interp_cost.h): one pass over the (n0, n1) Gram products, OpenMP over rows.
#include "interp/interp_cost.h"

#include <algorithm>
#include <cmath>

#include "common.h"

namespace pyfusion::interp {

namespace {

// The inner loop is elementwise over j with contiguous loads; target_clones lets gcc vectorise the
// sqrt / division with AVX-512 or AVX2 where the CPU has them while the module stays portable.
__attribute__((target_clones("avx512f", "avx2", "default"))) void cost_row(
    const double* __restrict M, const double* __restrict Q01, const double* __restrict Q10, double d0, double e0,
    double n0, double s0, const double* __restrict d1, const double* __restrict e1, const double* __restrict n1v,
    const double* __restrict s1, int64_t n1, bool squared, double* __restrict out) {
  for (int64_t j = 0; j < n1; ++j) {
    const double tot = s0 + s1[j];
    const double u = s0 / tot, v = s1[j] / tot;
    const double common = u * u * d0 + v * v * d1[j] + 2.0 * u * v * M[j];
    const double da = std::max(common - 2.0 * u * e0 - 2.0 * v * Q10[j] + n0, 0.0);
    const double db = std::max(common - 2.0 * u * Q01[j] - 2.0 * v * e1[j] + n1v[j], 0.0);
    out[j] = squared ? s0 * da + s1[j] * db : s0 * std::sqrt(da) + s1[j] * std::sqrt(db);
  }
}

}  // namespace

void hf_cost_cpu(const double* M, const double* Q01, const double* Q10, const double* d0, const double* e0,
                 const double* n0v, const double* s0, const double* d1, const double* e1, const double* n1v,
                 const double* s1, int64_t n0, int64_t n1, bool squared, double* out, int num_threads) {
  PF_CHECK(n0 >= 0 && n1 >= 0, "hf_cost: sizes must be non-negative; got (", n0, ", ", n1, ")");
  const int threads = resolve_threads(num_threads);
  (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (n0 * n1 > 16384)
  for (int64_t i = 0; i < n0; ++i) {
    const int64_t o = i * n1;
    cost_row(M + o, Q01 + o, Q10 + o, d0[i], e0[i], n0v[i], s0[i], d1, e1, n1v, s1, n1, squared, out + o);
  }
}

}  // namespace pyfusion::interp
