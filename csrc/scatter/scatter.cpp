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

#if defined(__GNUC__) || defined(__clang__)
#define PF_PREFETCH(p) __builtin_prefetch(p)
#else
#define PF_PREFETCH(p) ((void)(p))
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

// The tap count T is a compile-time constant where it is common (1: Linear, 9: 3x3 conv; 0: the runtime count), so
// an entry's taps are copied inline instead of by a memcpy call of 72 bytes. The time went to the source loads
// (below); a standalone run of the engine on a VGG11-sized layer (two 512 x 512 x 3 x 3 members into 640 x 640
// slots, 1 thread, output pages touched): 6.6 ms before, 2.8 ms with the prefetch and the per-block column map.
// Columns ahead of the prefetch (that run: 8: 4.5 ms, 16: 3.6, 32: 3.0, 64: 2.9, 128: 3.4, 256: 4.4).
constexpr int64_t kPrefetch = 64;

template <int T>
inline int64_t taps_of(int64_t taps) {
  return T > 0 ? T : taps;
}

// one fused row r of a block: members in `active` order; `first` writes, the others add
template <int T>
PF_NO_CONTRACT void one_row(const std::vector<Member>& members, const std::vector<Inverse>& inv,
                            const std::vector<std::vector<int64_t>>& src_col, const std::vector<int64_t>& active,
                            const Block& b, int64_t r, int64_t taps_rt, bool packed_zeros) {
  const int64_t taps = taps_of<T>(taps_rt);
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
    const int64_t* col = src_col[k].data();  // block column q -> member column, -1: none
    const double* src_row = m.src + i * m.n1 * taps;
    const bool plain = !has0 && !has1 && !m.scale_lam;  // the common dense-member case: a plain copy / add
    for (int64_t q = 0; q < b.n_cols; ++q) {
      double* o = row_out + q * taps;
      const int64_t j = col[q];
      // the member's columns arrive in slot order, i.e. permuted: each entry's taps were a cache miss the
      // hardware prefetcher cannot predict (53% of the engine's samples on the load, 640 x 640 x 9); ask for
      // the entry kPrefetch columns ahead (both of its lines: 9 taps span two)
      if (T != 1 && q + kPrefetch < b.n_cols) {  // one tap: the row is a few KB, L1 serves it (prefetching cost 7%)
        const int64_t jn = col[q + kPrefetch];
        if (jn >= 0) {
          const double* sn = src_row + jn * taps;
          PF_PREFETCH(sn);
          PF_PREFETCH(sn + taps - 1);
        }
      }
      if (j < 0) {
        if (first)
          for (int64_t t = 0; t < taps; ++t) o[t] = 0.0;
        else if (packed_zeros)
          for (int64_t t = 0; t < taps; ++t) o[t] = o[t] + 0.0;
        continue;
      }
      const double* s = src_row + j * taps;
      if (plain) {
        if (first)
          for (int64_t t = 0; t < taps; ++t) o[t] = s[t];
        else
          for (int64_t t = 0; t < taps; ++t) o[t] = o[t] + s[t];
        continue;
      }
      const double f1 = has1 ? m.v1[j] : 1.0;
      const double fa = m.v_first == 0 ? f0 : f1, fb = m.v_first == 0 ? f1 : f0;
      const bool ha = m.v_first == 0 ? has0 : has1, hb = m.v_first == 0 ? has1 : has0;
      if (first) {
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
// Advice only: it changes no value, and a kernel without THP ignores it. Tried and dropped: each output in its own
// 2 MB aligned mmap with MADV_HUGEPAGE (always fresh pages). In the partial-fusion bench (VGG11 pair, 1 thread,
// AMD EPYC VM) the swap took 31-34 ms with it against 20-26 ms with torch.empty plus this advice: glibc often hands
// back memory the process has already faulted (freed numpy / torch buffers), and fresh pages always pay their
// zeroing and faults (on this VM a fresh 2 MB page is sometimes slower than 512 small ones: the host backs it).
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
    // each member's column of every block column, composed once per block (not per row: one load less per entry)
    std::vector<std::vector<int64_t>> src_col(K);
    for (const int64_t k : active) {
      src_col[k].resize(b.n_cols);
      for (int64_t q = 0; q < b.n_cols; ++q) src_col[k][q] = inv[k].col[b.cols[q]];
    }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && b.n_rows * b.n_cols * taps > (1 << 16))
#endif
    for (int64_t r = b.row0; r < b.row0 + b.n_rows; ++r) {
      if (taps == 9) one_row<9>(members, inv, src_col, active, b, r, taps, packed_zeros);
      else if (taps == 1) one_row<1>(members, inv, src_col, active, b, r, taps, packed_zeros);
      else one_row<0>(members, inv, src_col, active, b, r, taps, packed_zeros);
    }
  }
  (void)nt;
}

}  // namespace pyfusion::scatter
