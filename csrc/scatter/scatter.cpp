// One-pass dense scatter: every fused entry is written once (no zero fill of the whole tensor, no scaled copy of
// each member, no index_add_ pass), with the torch path's arithmetic so the result is bit-equal to it.
#include "scatter/scatter.h"

#include <cstring>

#include "common.h"

// Contracting x = a * b followed by o + x into an FMA would change the last bit: never (PYFUSION_NATIVE builds).
#if defined(__clang__)
#pragma clang fp contract(off)
#define PF_NO_CONTRACT
#elif defined(__GNUC__)
#define PF_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define PF_NO_CONTRACT
#endif

namespace pyfusion::scatter {

namespace {

struct Inverse {
  std::vector<int64_t> row, col;  // fused row / column -> member row / column, -1 where the member does not reach
};

Inverse invert(const Member& m, int64_t k, int64_t N0, int64_t N1) {
  Inverse inv{std::vector<int64_t>(N0, -1), std::vector<int64_t>(N1, -1)};
  for (int64_t i = 0; i < m.n0; ++i) {
    const int64_t d = m.dest0[i];
    PF_CHECK(d >= 0 && d < N0, "scatter_dense: member ", k, " row ", i, " goes to row ", d, ", outside [0, ", N0, ")");
    PF_CHECK(inv.row[d] < 0, "scatter_dense: member ", k, " sends rows ", inv.row[d], " and ", i, " to row ", d,
             " (the map must be injective)");
    inv.row[d] = i;
  }
  for (int64_t j = 0; j < m.n1; ++j) {
    const int64_t d = m.dest1[j];
    PF_CHECK(d >= 0 && d < N1, "scatter_dense: member ", k, " column ", j, " goes to column ", d, ", outside [0, ",
             N1, ")");
    PF_CHECK(inv.col[d] < 0, "scatter_dense: member ", k, " sends columns ", inv.col[d], " and ", j, " to column ",
             d, " (the map must be injective)");
    inv.col[d] = j;
  }
  return inv;
}

// x = ((s * f_a) * f_b) * lam, each factor only where present: _scatter_source's products in its order
PF_NO_CONTRACT inline double scaled(double s, double fa, bool has_a, double fb, bool has_b, double lam,
                                    bool scale_lam) {
  double x = s;
  if (has_a) x = x * fa;
  if (has_b) x = x * fb;
  if (scale_lam) x = x * lam;
  return x;
}

PF_NO_CONTRACT void one_row(const std::vector<Member>& members, const std::vector<Inverse>& inv, int64_t r,
                            int64_t N1, int64_t taps, double* out) {
  double* row_out = out + r * N1 * taps;
  const int64_t K = static_cast<int64_t>(members.size());
  for (int64_t k = 0; k < K; ++k) {
    const Member& m = members[k];
    const int64_t i = inv[k].row[r];
    if (i < 0) {
      if (k == 0) std::memset(row_out, 0, sizeof(double) * N1 * taps);
      continue;
    }
    const bool has0 = m.v0 != nullptr, has1 = m.v1 != nullptr;
    const double f0 = has0 ? m.v0[i] : 1.0;
    const int64_t* col = inv[k].col.data();
    const double* src_row = m.src + i * m.n1 * taps;
    for (int64_t c = 0; c < N1; ++c) {
      double* o = row_out + c * taps;
      const int64_t j = col[c];
      if (j < 0) {
        if (k == 0) std::memset(o, 0, sizeof(double) * taps);
        continue;
      }
      const double f1 = has1 ? m.v1[j] : 1.0;
      const double fa = m.v_first == 0 ? f0 : f1, fb = m.v_first == 0 ? f1 : f0;
      const bool ha = m.v_first == 0 ? has0 : has1, hb = m.v_first == 0 ? has1 : has0;
      const double* s = src_row + j * taps;
      if (k == 0) {
        for (int64_t t = 0; t < taps; ++t) o[t] = scaled(s[t], fa, ha, fb, hb, m.lam, m.scale_lam);
      } else {
        for (int64_t t = 0; t < taps; ++t) o[t] = o[t] + scaled(s[t], fa, ha, fb, hb, m.lam, m.scale_lam);
      }
    }
  }
}

}  // namespace

void scatter_dense_f64(const std::vector<Member>& members, int64_t N0, int64_t N1, int64_t taps, double* out,
                       int threads) {
  PF_CHECK(!members.empty(), "scatter_dense: no members");
  PF_CHECK(N0 >= 0 && N1 >= 0 && taps >= 1, "scatter_dense: bad fused shape (", N0, ", ", N1, ", ", taps, ")");
  std::vector<Inverse> inv;
  inv.reserve(members.size());
  for (size_t k = 0; k < members.size(); ++k) inv.push_back(invert(members[k], static_cast<int64_t>(k), N0, N1));
  const int nt = resolve_threads(threads);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && N0 * N1 * taps > (1 << 16))
#endif
  for (int64_t r = 0; r < N0; ++r) one_row(members, inv, r, N1, taps, out);
  (void)nt;
}

}  // namespace pyfusion::scatter
