// One-pass dense scatter: every fused entry is written once (no zero fill of the whole tensor, no scaled copy of
// each member, no index_add_ pass), with the torch path's arithmetic so the result is bit-equal to it.
#include "scatter/scatter.h"

#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// one fused row r of a block: members in `active` order; `first` writes, the others add
PF_NO_CONTRACT void one_row(const std::vector<Member>& members, const std::vector<Inverse>& inv,
                            const std::vector<int64_t>& active, const Block& b, int64_t r, int64_t taps,
                            bool packed_zeros) {
  double* row_out = b.out + (r - b.row0) * b.n_cols * taps;
  bool first = true;
  for (const int64_t k : active) {
    const Member& m = members[k];
    const int64_t i = inv[k].row[r];
    if (i < 0) {  // the member does not reach this row
      if (first) std::memset(row_out, 0, sizeof(double) * b.n_cols * taps);
      else if (packed_zeros)
        for (int64_t e = 0; e < b.n_cols * taps; ++e) row_out[e] = row_out[e] + 0.0;
      first = false;
      continue;
    }
    const bool has0 = m.v0 != nullptr, has1 = m.v1 != nullptr;
    const double f0 = has0 ? m.v0[i] : 1.0;
    const int64_t* col = inv[k].col.data();
    const double* src_row = m.src + i * m.n1 * taps;
    for (int64_t q = 0; q < b.n_cols; ++q) {
      double* o = row_out + q * taps;
      const int64_t j = col[b.cols[q]];
      if (j < 0) {
        if (first) std::memset(o, 0, sizeof(double) * taps);
        else if (packed_zeros)
          for (int64_t t = 0; t < taps; ++t) o[t] = o[t] + 0.0;
        continue;
      }
      const double f1 = has1 ? m.v1[j] : 1.0;
      const double fa = m.v_first == 0 ? f0 : f1, fb = m.v_first == 0 ? f1 : f0;
      const bool ha = m.v_first == 0 ? has0 : has1, hb = m.v_first == 0 ? has1 : has0;
      const double* s = src_row + j * taps;
      if (!ha && !hb && !m.scale_lam) {  // the common dense-member case: a plain copy / add
        if (first) std::memcpy(o, s, sizeof(double) * taps);
        else
          for (int64_t t = 0; t < taps; ++t) o[t] = o[t] + s[t];
      } else if (first) {
        for (int64_t t = 0; t < taps; ++t) o[t] = scaled(s[t], fa, ha, fb, hb, m.lam, m.scale_lam);
      } else {
        for (int64_t t = 0; t < taps; ++t) o[t] = o[t] + scaled(s[t], fa, ha, fb, hb, m.lam, m.scale_lam);
      }
    }
    first = false;
  }
  if (first) std::memset(row_out, 0, sizeof(double) * b.n_cols * taps);  // no member takes part
}

// Ask for transparent huge pages on the (fresh, untouched) output: the fused tensors are tens of MB, and their
// first-touch page faults cost more than the scatter itself (a 896 x 896 x 3 x 3 float64 tensor: ~40 ms of faults
// against 15 ms of copying, 1 thread); with THP in "madvise" mode (the common default) this makes them 2 MB faults.
// Advice only: it changes no value, and a kernel without THP ignores it.
void advise_huge(double* p, int64_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge = uintptr_t{1} << 21;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), e = a + static_cast<uintptr_t>(n) * sizeof(double);
  const uintptr_t lo = (a + huge - 1) & ~(huge - 1), hi = e & ~(huge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

}  // namespace

void scatter_blocks_f64(const std::vector<Member>& members, int64_t N0, int64_t N1, int64_t taps,
                        const std::vector<Block>& blocks, bool packed_zeros, int threads) {
  PF_CHECK(!members.empty(), "scatter_blocks: no members");
  PF_CHECK(N0 >= 0 && N1 >= 0 && taps >= 1, "scatter_blocks: bad fused shape (", N0, ", ", N1, ", ", taps, ")");
  const int64_t K = static_cast<int64_t>(members.size());
  std::vector<Inverse> inv;
  inv.reserve(members.size());
  for (int64_t k = 0; k < K; ++k) inv.push_back(invert(members[k], k, N0, N1));
  const int nt = resolve_threads(threads);
  for (const Block& b : blocks) {
    PF_CHECK(b.row0 >= 0 && b.n_rows >= 0 && b.row0 + b.n_rows <= N0, "scatter_blocks: rows [", b.row0, ", ",
             b.row0 + b.n_rows, ") outside [0, ", N0, ")");
    for (int64_t q = 0; q < b.n_cols; ++q)
      PF_CHECK(b.cols[q] >= 0 && b.cols[q] < N1, "scatter_blocks: column ", b.cols[q], " outside [0, ", N1, ")");
    advise_huge(b.out, b.n_rows * b.n_cols * taps);
    std::vector<int64_t> active;
    for (int64_t k = 0; k < K; ++k) {
      if (!packed_zeros) {
        active.push_back(k);
        continue;
      }
      bool row_hit = false, col_hit = false;
      for (int64_t r = b.row0; r < b.row0 + b.n_rows && !row_hit; ++r) row_hit = inv[k].row[r] >= 0;
      for (int64_t q = 0; q < b.n_cols && !col_hit; ++q) col_hit = inv[k].col[b.cols[q]] >= 0;
      if (row_hit && col_hit) active.push_back(k);
    }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && b.n_rows * b.n_cols * taps > (1 << 16))
#endif
    for (int64_t r = b.row0; r < b.row0 + b.n_rows; ++r) one_row(members, inv, active, b, r, taps, packed_zeros);
  }
  (void)nt;
}

}  // namespace pyfusion::scatter
