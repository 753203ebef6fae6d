// Exact dense linear assignment: Jonker-Volgenant initialisation + Dijkstra shortest augmenting paths.
// See lsap.h for the problem statement and the partial (sink-augmented) forms.
//
// Performance notes (2-core AMD EPYC Zen 4 VM, float64; numbers in bench/results/assignment_cpu.md):
// * The Dijkstra step scans the whole cost row of the current row (contiguous, row-major) with SIMD
//   instead of a compacted list of unscanned columns (lap.lapjv's layout, a gather per column). A column
//   whose distance is final gets v = -inf and d = +inf, so the branch-free update
//   d = min(d, c - v - h) never touches it and the fused argmin never picks it.
// * Every O(n^2) phase (validation, column reduction, row reductions, scan) is a SIMD kernel compiled
//   three times (avx512f+dq+vl+bw, avx2, baseline) and picked once per process with
//   __builtin_cpu_supports, so the module stays portable (no -march=native). avx512f alone is not
//   enough: without avx512dq GCC 12 turns the 64-bit lane masks into scalar code.
// * Written with GCC vector extensions; only "float compare -> ternary select" patterns are used in the
//   loops, because GCC 12 scalarises float ==/!= and integer-mask selects on 512-bit vectors (checked
//   in the disassembly; the first validation pass was 4x slower than the solve it guarded).
#include "assignment/lsap.h"

#include "common.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"

namespace pyfusion {
namespace lsap {
namespace {

// Raised inside the core when no complete assignment avoids the forbidden entries.
struct Infeasible {};
// Raised by the column reduction when asked to validate and it met a NaN or -inf.
struct BadEntry {};

// Lane index type of the same width as T, so that comparison masks and index blends line up.
template <typename T>
using LaneInt = typename std::conditional<sizeof(T) == 8, int64_t, int32_t>::type;

// One Dijkstra step on row `row`: for every column j, d[j] = min(d[j], c[j] - v[j] - h) (pred[j] = row
// where it improved), and return the minimum of the updated d in *argmin. Among columns at the minimum,
// an unassigned one (pen[j] == 0) wins, then the smallest index: on costs with plateaus of equal reduced
// costs (the dummy blocks of the unmatched_cost form, integer costs) popping assigned columns first made
// each augmentation scan O(n) rows (1024 x 1024 unmatched_cost solve: 1.3 s before, scipy 0.2 s).
template <typename T, int W>
static inline __attribute__((always_inline)) T scan_impl(const T* __restrict ci, const T* __restrict v,
                                                        T* __restrict d, LaneInt<T>* __restrict pred,
                                                        const T* __restrict pen, int m, T h,
                                                        LaneInt<T> row, int* argmin) {
  using I = LaneInt<T>;
  typedef T vt __attribute__((vector_size(sizeof(T) * W)));
  typedef I vi __attribute__((vector_size(sizeof(I) * W)));
  const T inf = std::numeric_limits<T>::infinity();
  vt best = vt{} + inf;
  vi bidx = vi{} - 1;
  vt bestf = vt{} + inf;
  vi bidxf = vi{} - 1;
  vi idx;
  for (int k = 0; k < W; ++k) idx[k] = k;
  const vt hv = vt{} + h;
  const vi rowv = vi{} + row;
  int j = 0;
  for (; j + W <= m; j += W) {
    vt cv, vv, dv;
    vi pv;
    vt penv;
    std::memcpy(&cv, ci + j, sizeof(vt));
    std::memcpy(&vv, v + j, sizeof(vt));
    std::memcpy(&dv, d + j, sizeof(vt));
    std::memcpy(&pv, pred + j, sizeof(vi));
    std::memcpy(&penv, pen + j, sizeof(vt));
    const vt nd = cv - vv - hv;
    const vi lt = (vi)(nd < dv);
    dv = lt ? nd : dv;
    pv = lt ? rowv : pv;
    std::memcpy(d + j, &dv, sizeof(vt));
    std::memcpy(pred + j, &pv, sizeof(vi));
    // Best overall and best among free columns (pen = 0 free, +inf assigned), per lane; ties between the
    // two are resolved after the loop. Only float compares feeding ternaries: GCC 12 scalarises integer
    // or equality masks on these vector types.
    const vi lb = (vi)(dv < best);
    best = lb ? dv : best;
    bidx = lb ? idx : bidx;
    const vt dvf = dv + penv;
    const vi lf = (vi)(dvf < bestf);
    bestf = lf ? dvf : bestf;
    bidxf = lf ? idx : bidxf;
    idx += W;
  }
  T bv = inf;
  I bi = -1;
  bool bf = false;
  auto consider = [&](T dd, I jj, bool fr) {
    if (jj < 0) return;
    if (dd < bv || (dd == bv && (bi < 0 || (fr && !bf) || (fr == bf && jj < bi)))) {
      bv = dd;
      bi = jj;
      bf = fr;
    }
  };
  for (int k = 0; k < W; ++k) {
    consider(best[k], bidx[k], false);
    consider(bestf[k], bidxf[k], true);
  }
  for (; j < m; ++j) {
    const T nd = ci[j] - v[j] - h;
    if (nd < d[j]) {
      d[j] = nd;
      pred[j] = row;
    }
    if (d[j] < inf) consider(d[j], j, pen[j] == T(0));
  }
  *argmin = static_cast<int>(bi);
  return bv;
}

// True if x[0..len) holds a NaN or the value `bad` (the infinity of the wrong sign). Integer compares
// on the bit patterns (NaN: |bits| above the infinity pattern) in a plain loop that GCC auto-vectorises;
// float NaN compares and explicit vector masks are scalarised by GCC 12 under avx512.
template <typename T, int W>
static inline __attribute__((always_inline)) bool has_bad_impl(const T* __restrict x, int64_t len, T bad) {
  using I = LaneInt<T>;
  const T inf = std::numeric_limits<T>::infinity();
  I inf_bits, bad_bits;
  std::memcpy(&inf_bits, &inf, sizeof(I));
  std::memcpy(&bad_bits, &bad, sizeof(I));
  const I abs_mask = std::numeric_limits<I>::max();
  typedef I __attribute__((may_alias)) AliasI;  // read the float bits without breaking strict aliasing
  const AliasI* xb = reinterpret_cast<const AliasI*>(x);
  I acc = 0;
  for (int64_t j = 0; j < len; ++j) {
    const I b = xb[j];
    acc |= static_cast<I>(((b & abs_mask) > inf_bits) | (b == bad_bits));
  }
  return acc != 0;
}

// Column reduction, one row: v = min(v, ci) with the argmin row in ar (first minimum kept). Returns true
// if the row holds a NaN or -inf (an ordered compare x > -inf fails for both), so that the square
// minimise path validates its input in the same pass (a separate pass was 22% of a 2048 correlation solve).
template <typename T, int W>
static inline __attribute__((always_inline)) bool colmin_impl(const T* __restrict ci, T* __restrict v,
                                                             LaneInt<T>* __restrict ar, int n, LaneInt<T> row) {
  using I = LaneInt<T>;
  typedef T vt __attribute__((vector_size(sizeof(T) * W)));
  typedef I vi __attribute__((vector_size(sizeof(I) * W)));
  const T inf = std::numeric_limits<T>::infinity();
  const vi rowv = vi{} + row;
  const vt lo = vt{} - inf;
  vt okv = vt{} + T(1);
  const vt zero = vt{};
  int j = 0;
  for (; j + W <= n; j += W) {
    vt cv, vv;
    vi av;
    std::memcpy(&cv, ci + j, sizeof(vt));
    std::memcpy(&vv, v + j, sizeof(vt));
    std::memcpy(&av, ar + j, sizeof(vi));
    const vi lt = (vi)(cv < vv);
    vv = lt ? cv : vv;
    av = lt ? rowv : av;
    okv = (vi)(cv > lo) ? okv : zero;
    std::memcpy(v + j, &vv, sizeof(vt));
    std::memcpy(ar + j, &av, sizeof(vi));
  }
  bool bad = false;
  for (int k = 0; k < W; ++k) bad |= !(okv[k] > T(0));
  for (; j < n; ++j) {
    bad |= !(ci[j] > -inf);
    if (ci[j] < v[j]) {
      v[j] = ci[j];
      ar[j] = row;
    }
  }
  return bad;
}

// Smallest and second smallest of ci[j] - v[j] with their first indices (augmenting row reduction).
// Per lane: h < u1 -> new first (old first becomes second); else h < u2 -> new second.
template <typename T, int W>
static inline __attribute__((always_inline)) void min2_impl(const T* __restrict ci, const T* __restrict v, int n,
                                                           T* u1o, int* j1o, T* u2o, int* j2o) {
  using I = LaneInt<T>;
  typedef T vt __attribute__((vector_size(sizeof(T) * W)));
  typedef I vi __attribute__((vector_size(sizeof(I) * W)));
  const T inf = std::numeric_limits<T>::infinity();
  vt u1 = vt{} + inf, u2 = vt{} + inf;
  vi j1 = vi{} - 1, j2 = vi{} - 1, idx;
  for (int k = 0; k < W; ++k) idx[k] = k;
  int j = 0;
  for (; j + W <= n; j += W) {
    vt cv, vv;
    std::memcpy(&cv, ci + j, sizeof(vt));
    std::memcpy(&vv, v + j, sizeof(vt));
    const vt h = cv - vv;
    const vi lt1 = (vi)(h < u1);
    const vi lt2 = (vi)(h < u2);
    u2 = lt1 ? u1 : (lt2 ? h : u2);
    j2 = lt1 ? j1 : (lt2 ? idx : j2);
    u1 = lt1 ? h : u1;
    j1 = lt1 ? idx : j1;
    idx += W;
  }
  // Merge the lanes' (u1, j1), (u2, j2) candidates, plus the scalar tail, in index order for ties.
  T a1 = inf, a2 = inf;
  int b1 = -1, b2 = -1;
  auto push = [&](T h, int jj) {
    if (jj < 0) return;
    const bool first = h < a1 || (h == a1 && (b1 < 0 || jj < b1));
    if (first) {
      a2 = a1;
      b2 = b1;
      a1 = h;
      b1 = jj;
    } else if (h < a2 || (h == a2 && (b2 < 0 || jj < b2))) {
      a2 = h;
      b2 = jj;
    }
  };
  for (int k = 0; k < W; ++k) {
    push(u1[k], static_cast<int>(j1[k]));
    push(u2[k], static_cast<int>(j2[k]));
  }
  for (; j < n; ++j) push(ci[j] - v[j], j);
  *u1o = a1;
  *j1o = b1;
  *u2o = a2;
  *j2o = b2;
}

template <typename T>
struct Kernels {
  T (*scan)(const T*, const T*, T*, LaneInt<T>*, const T*, int, T, LaneInt<T>, int*);
  bool (*has_bad)(const T*, int64_t, T);
  bool (*colmin)(const T*, T*, LaneInt<T>*, int, LaneInt<T>);
  void (*min2)(const T*, const T*, int, T*, int*, T*, int*);
};

#define PF_KERNELS(SUFFIX, TARGET, T, W)                                                                        \
  TARGET static T scan_##SUFFIX(const T* ci, const T* v, T* d, LaneInt<T>* pred, const T* pen, int m, T h,      \
                                LaneInt<T> row, int* am) {                                                     \
    return scan_impl<T, W>(ci, v, d, pred, pen, m, h, row, am);                                                \
  }                                                                                                            \
  TARGET static bool has_bad_##SUFFIX(const T* x, int64_t len, T bad) { return has_bad_impl<T, W>(x, len, bad); } \
  TARGET static bool colmin_##SUFFIX(const T* ci, T* v, LaneInt<T>* ar, int n, LaneInt<T> row) {                 \
    return colmin_impl<T, W>(ci, v, ar, n, row);                                                               \
  }                                                                                                            \
  TARGET static void min2_##SUFFIX(const T* ci, const T* v, int n, T* u1, int* j1, T* u2, int* j2) {            \
    min2_impl<T, W>(ci, v, n, u1, j1, u2, j2);                                                                 \
  }                                                                                                            \
  static const Kernels<T> kernels_##SUFFIX = {scan_##SUFFIX, has_bad_##SUFFIX, colmin_##SUFFIX, min2_##SUFFIX};
PF_KERNELS(d_avx512, __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw"))), double, 8)
PF_KERNELS(d_avx2, __attribute__((target("avx2"))), double, 4)
PF_KERNELS(d_base, , double, 2)
PF_KERNELS(f_avx512, __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw"))), float, 16)
PF_KERNELS(f_avx2, __attribute__((target("avx2"))), float, 8)
PF_KERNELS(f_base, , float, 4)
#undef PF_KERNELS

static int hw_level() {
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw"))
      return 2;
    if (__builtin_cpu_supports("avx2")) return 1;
    return 0;
  }();
  return level;
}

// Test hook: a lower level than the hardware's can be forced so that every kernel variant is tested on
// one machine (set_simd_level); -1 means "what the CPU supports".
static std::atomic<int> forced_level{-1};

static int cpu_level() {
  const int f = forced_level.load(std::memory_order_relaxed);
  return f >= 0 ? std::min(f, hw_level()) : hw_level();
}

template <typename T>
const Kernels<T>& kernels();
template <>
const Kernels<double>& kernels<double>() {
  const int l = cpu_level();
  return l == 2 ? kernels_d_avx512 : l == 1 ? kernels_d_avx2 : kernels_d_base;
}
template <>
const Kernels<float>& kernels<float>() {
  const int l = cpu_level();
  return l == 2 ? kernels_f_avx512 : l == 1 ? kernels_f_avx2 : kernels_f_base;
}

// Solves the n x m problem (n <= m) on cost c (row-major), writing col4row (n entries).
template <typename T>
class Core {
 public:
  using I = LaneInt<T>;

  // check_entries: the column reduction (square problems) throws BadEntry on a NaN or -inf entry.
  Core(const T* c, int n, int m, bool check_entries = false)
      : c_(c), n_(n), m_(m), check_entries_(check_entries), k_(kernels<T>()) {}

  void solve(int32_t* col4row) {
    const T inf = std::numeric_limits<T>::infinity();
    col4row_ = col4row;
    std::fill(col4row_, col4row_ + n_, -1);
    row4col_.assign(m_, -1);
    v_.assign(m_, T(0));
    d_.assign(m_, inf);
    pred_.assign(m_, -1);
    std::vector<int> free_rows;
    if (n_ == m_) {
      jv_init(free_rows);
    } else {
      greedy_init(free_rows);
    }
    pen_.resize(m_);
    for (int j = 0; j < m_; ++j) pen_[j] = row4col_[j] < 0 ? T(0) : inf;
    for (int f : free_rows) augment(f);
  }

 private:
  const T* row(int i) const { return c_ + static_cast<int64_t>(i) * m_; }

  // Rectangular start (v = 0): a row whose cheapest column is still free takes it. The assigned column
  // is the row's minimum of c - v, which is the invariant the augmenting paths need.
  void greedy_init(std::vector<int>& free_rows) {
    for (int i = 0; i < n_; ++i) {
      const T* ci = row(i);
      int jb = static_cast<int>(std::min_element(ci, ci + m_) - ci);
      if (ci[jb] < std::numeric_limits<T>::infinity() && row4col_[jb] < 0) {
        row4col_[jb] = i;
        col4row_[i] = jb;
      } else {
        free_rows.push_back(i);
      }
    }
  }

  // Jonker-Volgenant: column reduction, reduction transfer, two rounds of augmenting row reduction.
  void jv_init(std::vector<int>& free_rows) {
    const T inf = std::numeric_limits<T>::infinity();
    const int n = n_;
    std::vector<I> argrow(n, 0);
    // Column reduction: v_j = min_i c_ij, row-major so that every row is read contiguously.
    std::fill(v_.begin(), v_.end(), inf);
    bool bad = false;
    for (int i = 0; i < n; ++i) bad |= k_.colmin(row(i), v_.data(), argrow.data(), n, static_cast<I>(i));
    if (bad && check_entries_) throw BadEntry{};
    std::vector<int> matches(n, 0);
    for (int j = n - 1; j >= 0; --j) {
      if (!(v_[j] < inf)) throw Infeasible{};  // a column with only forbidden entries
      const int i = static_cast<int>(argrow[j]);
      if (++matches[i] == 1) {
        col4row_[i] = j;
        row4col_[j] = i;
      }
    }
    // Reduction transfer: an uncontested row pushes its column's price down to its second-best option.
    // It costs one more pass over the matrix and only helps the later row reduction, so it is skipped
    // when the column reduction left fewer than n/16 rows free (correlation costs of permuted noisy
    // copies: usually none free; n = 2048 solve 2.8 -> 1.5 ms; uniform costs leave ~37% free and keep it).
    int nfree0 = 0;
    for (int i = 0; i < n; ++i) nfree0 += matches[i] == 0;
    const bool transfer = static_cast<int64_t>(nfree0) * 16 >= n;
    for (int i = 0; i < n; ++i) {
      if (matches[i] == 0) {
        free_rows.push_back(i);
        continue;
      }
      if (matches[i] != 1 || !transfer) continue;
      const int j1 = col4row_[i];
      // min over j != j1 of c_ij - v_j: the second smallest (the smallest is 0 at j1, possibly tied).
      T a1, a2;
      int b1, b2;
      k_.min2(row(i), v_.data(), n, &a1, &b1, &a2, &b2);
      const T mn = b1 == j1 ? a2 : a1;
      if (mn < inf) v_[j1] -= mn;
    }
    // Augmenting row reduction (two rounds). The step cap guards against float absorption cycles
    // (v[j1] - delta == v[j1]); rows left over simply go to the augmenting-path phase.
    int64_t budget = 8 * static_cast<int64_t>(n) + 64;
    for (int round = 0; round < 2 && !free_rows.empty(); ++round) {
      std::vector<int> next;
      size_t k = 0;
      std::vector<int> cur = free_rows;
      while (k < cur.size()) {
        if (--budget < 0) {
          next.insert(next.end(), cur.begin() + k, cur.end());
          break;
        }
        const int i = cur[k++];
        T u1, u2;
        int j1, j2;
        k_.min2(row(i), v_.data(), n, &u1, &j1, &u2, &j2);
        if (!(u1 < inf)) throw Infeasible{};  // every entry of row i is forbidden
        int i0 = row4col_[j1];
        const T lowered = (u2 < inf) ? v_[j1] - (u2 - u1) : v_[j1];
        const bool strict = lowered < v_[j1];
        if (strict) {
          v_[j1] = lowered;
        } else if (i0 >= 0 && j2 >= 0 && u2 < inf) {
          j1 = j2;  // a tie: take the second column and avoid kicking out the same row back and forth
          i0 = row4col_[j1];
        }
        if (i0 >= 0) col4row_[i0] = -1;
        col4row_[i] = j1;
        row4col_[j1] = i;
        if (i0 >= 0) {
          if (strict) {
            cur[--k] = i0;  // the price went down: retry the evicted row at once
          } else {
            next.push_back(i0);
          }
        }
      }
      free_rows.swap(next);
    }
  }

  // Dijkstra from free row f over reduced costs c_ij - v_j, then dual update and path flip.
  void augment(int f) {
    const T inf = std::numeric_limits<T>::infinity();
    done_j_.clear();
    done_d_.clear();
    done_v_.clear();
    T h = 0;
    int i = f;
    int j = -1;
    T dmin;
    while (true) {
      dmin = k_.scan(row(i), v_.data(), d_.data(), pred_.data(), pen_.data(), m_, h, static_cast<I>(i), &j);
      if (!(dmin < inf)) {
        for (size_t k = 0; k < done_j_.size(); ++k) v_[done_j_[k]] = done_v_[k];
        throw Infeasible{};
      }
      done_j_.push_back(j);
      done_d_.push_back(dmin);
      done_v_.push_back(v_[j]);
      v_[j] = -inf;  // final: c - v = +inf from now on, so the scan never updates or picks it
      d_[j] = inf;
      const int i2 = row4col_[j];
      if (i2 < 0) break;
      h = row(i2)[j] - done_v_.back() - dmin;
      i = i2;
    }
    for (size_t k = 0; k < done_j_.size(); ++k) v_[done_j_[k]] = done_v_[k] + (done_d_[k] - dmin);
    pen_[j] = std::numeric_limits<T>::infinity();  // the sink column is assigned from now on
    std::fill(d_.begin(), d_.end(), inf);
    while (true) {
      const int ip = static_cast<int>(pred_[j]);
      row4col_[j] = ip;
      std::swap(j, col4row_[ip]);
      if (ip == f) break;
    }
  }

  const T* c_;
  int n_, m_;
  bool check_entries_;
  int32_t* col4row_ = nullptr;
  std::vector<int32_t> row4col_;
  std::vector<T> pen_;  // 0 for an unassigned column, +inf for an assigned one (read by the scan)
  std::vector<T> v_, d_;
  std::vector<I> pred_;
  std::vector<int> done_j_;
  std::vector<T> done_d_, done_v_;
  const Kernels<T>& k_;
};

// Direct k-cardinality (partial) assignment on the n x m cost, without the sink-padded square problem.
//
// Successive shortest paths (Ahuja, Magnanti & Orlin 1993, "Network Flows", §9.7; for this problem Dell'Amico &
// Martello 1997, "The k-cardinality assignment problem", Discrete Appl. Math. 76): in the network
// source -> rows -> columns -> sink with unit capacities, augmenting the current flow along a shortest
// source-sink path in the residual graph keeps it a minimum-cost flow of its value, so after a augmentations
// the matching is an optimal a-cardinality assignment, and the path costs Delta_1 <= Delta_2 <= ... are
// non-decreasing (the optimal cost is convex in the flow value).
//
// Potentials. The columns carry v_j (reduced cost c_ij - u_i - v_j >= 0, = 0 on matched pairs; u implicit, as in
// Core). Two invariants make the source and the sink disappear from the Dijkstra:
//   * every free row has the same u (the source edges all have reduced cost 0): the search starts from all free
//     rows at once, d_j = min_{i free} c_ij - v_j;
//   * every free column keeps v_j = 0 (initial value): the search stops at the first free column popped, whose
//     label is the shortest source-sink distance; only popped columns change v (v_j += d_j - d_min), and the
//     only free column popped is the path's end, which becomes matched.
// The path's cost in the original costs telescopes to Delta = d_min + v_end = d_min. Hence:
//   * num_matches = k: run exactly k augmentations (d_min = +inf before that: fewer than k pairs avoid the
//     forbidden entries, infeasible);
//   * unmatched_cost = u: the objective sum_M c_ij + u (n + m - 2|M|) changes by Delta - 2u per augmentation and
//     Delta is non-decreasing, so augment while Delta < 2u and stop at the first Delta >= 2u (a tie changes
//     nothing). Labels only grow during a search, so the search stops as soon as a popped label reaches 2u.
// The minimum over free rows of each column (cmin, with its row carg) is kept up to date: when a row is matched
// only the columns whose argmin it was are recomputed from the transposed copy, stopping early at an entry equal
// to the old minimum (the free set shrinks, so the minimum cannot go down): O(m) per augmentation on costs
// without ties, O(1) per column on all-equal costs.
// The search itself is a Dijkstra with a queue instead of Core's full row scans: after the one full scan of the
// free rows (cmin), a popped matched column's row is relaxed only on the entries that can still be popped before
// the end (relax_row: its few smallest entries, kept sorted), and the next column comes from a binary heap in the
// scan's order. It pops exactly the columns the full scans would, in the same order, with the same labels: the
// same matching and duals, bit for bit (checked against the full-scan engine on random, tied, duplicated,
// forbidden, float32 and maximised problems when it was written).
template <typename T>
class KCardCore {
 public:
  using I = LaneInt<T>;

  // c: n x m row-major; ct: its m x n transpose (both already negated when maximising).
  KCardCore(const T* c, const T* ct, int n, int m) : c_(c), ct_(ct), n_(n), m_(m), k_(kernels<T>()) {}

  // Augments `max_pairs` times (or until a shortest path costs >= stop_at), writing col4row (n entries, -1:
  // unmatched). Throws Infeasible when fewer than max_pairs pairs avoid +inf and stop_at is +inf, BadEntry when an
  // entry is NaN or -inf (found by the column minima).
  void solve(int64_t max_pairs, T stop_at, int32_t* col4row) {
    const T inf = std::numeric_limits<T>::infinity();
    std::fill(col4row, col4row + n_, -1);
    col4row_ = col4row;
    row4col_.assign(m_, -1);
    v_.assign(m_, T(0));
    d_.assign(m_, inf);
    pred_.assign(m_, -1);
    pen_.assign(m_, T(0));
    cmin_.assign(m_, inf);
    carg_.assign(m_, -1);
    // the column minima also validate the entries (solve_one skips its separate pass for this engine)
    bool bad = false;
    for (int i = 0; i < n_; ++i) bad |= k_.colmin(row(i), cmin_.data(), carg_.data(), m_, static_cast<I>(i));
    if (bad) throw BadEntry{};
    free_rows_.resize(n_);
    where_.resize(n_);
    std::iota(free_rows_.begin(), free_rows_.end(), 0);
    std::iota(where_.begin(), where_.end(), 0);
    for (int64_t a = 0; a < max_pairs; ++a) {
      const int f = augment(stop_at);
      if (f == -2) return;  // the next path costs >= stop_at
      if (f < 0) throw Infeasible{};
      remove_free_row(f);
    }
  }

 private:
  const T* row(int i) const { return c_ + static_cast<int64_t>(i) * m_; }

  // One shortest augmenting path from all free rows; returns the free row it started from, -1 if no free column
  // is reachable, -2 if the path would cost >= stop_at (nothing changed in both cases).
  int augment(T stop_at) {
    const T inf = std::numeric_limits<T>::infinity();
    done_j_.clear();
    done_d_.clear();
    done_v_.clear();
    int j = -1;
    // The free rows as one virtual row: d_j = cmin_j - v_j, pred_j = carg_j (every column, so d_ needs no reset
    // between searches: no column is final here, and a search that ends writes no label after this). The same
    // values as Core's scan from an all-inf d with h = 0: (c - v) - 0 == c - v.
    for (int q = 0; q < m_; ++q) {
      d_[q] = cmin_[q] - v_[q];
      pred_[q] = carg_[q];
    }
    // bound_: the best label of a free column so far (only goes down); every column at or below it is queued.
    // pen is 0 on a free column, +inf on an assigned one; four running minima, so that the loop is not one chain of
    // dependent min operations (GCC does not vectorise a floating-point min reduction without -ffast-math)
    T b0 = inf, b1 = inf, b2 = inf, b3 = inf;
    int q = 0;
    for (; q + 4 <= m_; q += 4) {
      b0 = std::min(b0, d_[q] + pen_[q]);
      b1 = std::min(b1, d_[q + 1] + pen_[q + 1]);
      b2 = std::min(b2, d_[q + 2] + pen_[q + 2]);
      b3 = std::min(b3, d_[q + 3] + pen_[q + 3]);
    }
    for (; q < m_; ++q) b0 = std::min(b0, d_[q] + pen_[q]);
    bound_ = std::min(std::min(b0, b1), std::min(b2, b3));
    heap_.clear();
    for (q = 0; q < m_; ++q)
      if (d_[q] <= bound_) heap_.push_back({d_[q], pen_[q] != T(0), q});
    std::make_heap(heap_.begin(), heap_.end(), Later{});
    auto undo = [&]() {
      for (size_t k = 0; k < done_j_.size(); ++k) v_[done_j_[k]] = done_v_[k];
      std::fill(d_.begin(), d_.end(), inf);
    };
    while (true) {
      T dmin = pop(&j);
      if (!(dmin < inf)) {  // no free column reachable: infeasible for a fixed k, the end for a sink cost
        undo();
        return stop_at < inf ? -2 : -1;
      }
      if (dmin >= stop_at) {
        undo();
        return -2;
      }
      done_j_.push_back(j);
      done_d_.push_back(dmin);
      done_v_.push_back(v_[j]);
      v_[j] = -inf;  // final (see Core::augment)
      d_[j] = inf;
      const int i2 = row4col_[j];
      if (i2 < 0) break;
      relax_row(i2, row(i2)[j] - done_v_.back() - dmin);
    }
    const T dmin = done_d_.back();
    for (size_t k = 0; k < done_j_.size(); ++k) v_[done_j_[k]] = done_v_[k] + (done_d_[k] - dmin);
    pen_[j] = inf;
    while (true) {  // flip the path back to the free row it started from
      const int ip = static_cast<int>(pred_[j]);
      row4col_[j] = ip;
      const int old = col4row_[ip];
      col4row_[ip] = j;
      if (old < 0) return ip;
      j = old;
    }
  }

  // Queue entries: (label, assigned, column), popped smallest first: the scan's order (smallest label, a free column
  // before an assigned one, then the smallest index), so the search pops the columns Core's full scans would.
  struct Entry {
    T d;
    bool assigned;
    int j;
  };
  struct Later {
    bool operator()(const Entry& a, const Entry& b) const {
      if (a.d != b.d) return a.d > b.d;
      if (a.assigned != b.assigned) return a.assigned;
      return a.j > b.j;
    }
  };

  // The next column of the search: the smallest queued entry that is still current (a column's label only goes
  // down, and a final column's label is +inf, so an entry whose label is not the column's is stale). +inf when
  // the queue is empty (no free column reachable).
  T pop(int* j) {
    while (!heap_.empty()) {
      std::pop_heap(heap_.begin(), heap_.end(), Later{});
      const Entry e = heap_.back();
      heap_.pop_back();
      if (e.d == d_[e.j]) {
        *j = e.j;
        return e.d;
      }
    }
    *j = -1;
    return std::numeric_limits<T>::infinity();
  }

  // Relaxes row i (entered at offset h) only where that can matter. The search ends at a free column whose label
  // is at most bound_, so a column whose new label c_ij - v_j - h would exceed bound_ is never popped (a free
  // column with that label is not the best one; an assigned one comes after the end), and its label need not be
  // lowered. As v <= 0 on every column that is not final (its labels only lower v: d_j <= d_min) and rounding is
  // monotone, fl(fl(c_ij - v_j) - h) >= fl(c_ij - h): an entry with fl(c_ij - h) > bound_ is such a column. Each
  // row keeps its kShort smallest entries sorted (built on its first scan) and the smallest value left out: when
  // that value minus h is already above bound_, the sorted entries up to the first one above bound_ are all the
  // scan needs. On the squared distances of an MLP-1024 pair (k = 768) a scanned row has ~2.6 such entries on
  // average (of 1024), and the full scans were ~75% of the solve.
  void relax_row(int i, T h) {
    const T inf = std::numeric_limits<T>::infinity();
    const T* ci = row(i);
    if (short_len_.empty()) {
      short_len_.assign(n_, -1);
      short_rest_.assign(n_, inf);
      short_c_.resize(static_cast<size_t>(n_) * kShort);
      short_j_.resize(static_cast<size_t>(n_) * kShort);
    }
    if (short_len_[i] < 0) build_short(i);
    auto relax = [&](int q, T nd) {
      if (!(nd < d_[q])) return;
      d_[q] = nd;
      pred_[q] = static_cast<I>(i);
      const bool free = pen_[q] == T(0);
      if (free && nd < bound_) bound_ = nd;
      if (nd <= bound_) {
        heap_.push_back({nd, !free, q});
        std::push_heap(heap_.begin(), heap_.end(), Later{});
      }
    };
    if (short_rest_[i] - h > bound_) {
      const T* sc = short_c_.data() + static_cast<size_t>(i) * kShort;
      const int* sj = short_j_.data() + static_cast<size_t>(i) * kShort;
      for (int t = 0; t < short_len_[i]; ++t) {
        if (sc[t] - h > bound_) break;
        relax(sj[t], sc[t] - v_[sj[t]] - h);
      }
    } else {
      for (int q = 0; q < m_; ++q) relax(q, ci[q] - v_[q] - h);
    }
  }

  void build_short(int i) {
    const T* ci = row(i);
    std::vector<std::pair<T, int>>& all = short_tmp_;
    all.resize(m_);
    for (int q = 0; q < m_; ++q) all[q] = {ci[q], q};
    const int len = std::min(m_, kShort);
    if (len < m_) {
      std::nth_element(all.begin(), all.begin() + len, all.end());
      short_rest_[i] = all[len].first;  // every entry left out is >= this one
    }
    std::sort(all.begin(), all.begin() + len);
    T* sc = short_c_.data() + static_cast<size_t>(i) * kShort;
    int* sj = short_j_.data() + static_cast<size_t>(i) * kShort;
    for (int t = 0; t < len; ++t) {
      sc[t] = all[t].first;
      sj[t] = all[t].second;
    }
    short_len_[i] = len;
  }

  void remove_free_row(int f) {
    const T inf = std::numeric_limits<T>::infinity();
    const int p = where_[f];
    const int last = free_rows_.back();
    free_rows_[p] = last;
    where_[last] = p;
    free_rows_.pop_back();
    const int nf = static_cast<int>(free_rows_.size());
    const int* fr = free_rows_.data();
    for (int j = 0; j < m_; ++j) {
      if (carg_[j] != f) continue;
      const T* col = ct_ + static_cast<int64_t>(j) * n_;
      const T old = cmin_[j];
      T best = inf;
      int bi = -1;
      for (int t = 0; t < nf; ++t) {
        const T x = col[fr[t]];
        if (x < best) {
          best = x;
          bi = fr[t];
          if (x == old) break;  // cannot go lower: the free set only shrinks
        }
      }
      cmin_[j] = best;
      carg_[j] = static_cast<I>(bi);
    }
  }

  const T* c_;
  const T* ct_;
  int n_, m_;
  int32_t* col4row_ = nullptr;
  std::vector<int32_t> row4col_;
  std::vector<T> pen_, v_, d_, cmin_;
  std::vector<I> pred_, carg_;
  std::vector<int> free_rows_, where_;
  std::vector<int> done_j_;
  std::vector<T> done_d_, done_v_;
  static constexpr int kShort = 32;  // sorted smallest entries kept per row (relax_row)
  T bound_ = std::numeric_limits<T>::infinity();
  std::vector<Entry> heap_;
  std::vector<int> short_len_;
  std::vector<T> short_rest_, short_c_;
  std::vector<int> short_j_;
  std::vector<std::pair<T, int>> short_tmp_;
  const Kernels<T>& k_;
};

// Solves one problem; throws std::invalid_argument with a message that names `name` (e.g. "cost[3]").
template <typename T>
void solve_one(const Problem& p, const Options& opt, const std::string& name, int64_t* out, double* total) {
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t n = p.n, m = p.m;
  const T* c = static_cast<const T*>(p.cost);
  const bool mx = opt.maximize;
  // Validation: bad input changes nothing. Scalar search for the position, run only once a vector pass
  // found something wrong.
  auto locate_bad = [&]() {
    for (int64_t i = 0; i < n; ++i) {
      const T* ci = c + i * m;
      for (int64_t j = 0; j < m; ++j) {
        const T x = ci[j];
        const std::string at = " at (" + std::to_string(i) + ", " + std::to_string(j) + "); ";
        if (std::isnan(x)) throw std::invalid_argument(name + " contains NaN" + at + "costs must be numbers (+inf marks a forbidden pair)");
        if (!mx && x == -inf)
          throw std::invalid_argument(name + " contains -inf" + at + "when minimising only +inf (a forbidden pair) is allowed");
        if (mx && x == inf)
          throw std::invalid_argument(name + " contains +inf" + at + "when maximising only -inf (a forbidden pair) is allowed");
      }
    }
  };
  const T sgn = mx ? T(-1) : T(1);
  const bool partial_k = p.num_matches >= 0;
  const bool partial_u = opt.has_unmatched_cost;
  // Direct k-cardinality solve (KCardCore) unless asked for the padded one or k is close to min(n, m): the
  // successive shortest paths get long as the matching fills up, while the padded problem then has few dummies
  // and JV's initialisation does most of the work. Measured with the short-row relaxation of KCardCore on
  // 1024 x 1024 costs (1 thread, loaded 2-core VM, best of 3; direct / padded ms): the squared distances of an
  // MLP-1024 pair's first layer: k = 768: 30 / 122, 896: 53 / 98, 960: 69 / 59, 1000: 60 / 28; random squared
  // distances (256 features): 896: 54 / 69, 960: 67 / 47; uniform [0, 1): 896: 30 / 75, 960: 51 / 45. Both are
  // exact; only the work differs.
  const int64_t kmax = std::min(n, m);
  const bool padded = opt.partial_engine == PartialEngine::kPadded ||
                      (opt.partial_engine == PartialEngine::kAuto && partial_k && !partial_u &&
                       10 * p.num_matches > 9 * kmax && p.num_matches < kmax);
  const bool direct = !((partial_k || partial_u) && padded) &&
                      ((partial_k && (p.num_matches < kmax || opt.partial_engine == PartialEngine::kDirect)) ||
                       partial_u);
  // Square minimise problems are validated inside the column reduction, and the direct k-cardinality solve inside
  // its column minima over the rows (the same pass over the matrix: a NaN or an infinity of the wrong sign, which
  // the negated copy of a maximisation turns into -inf, fails the ordered compare x > -inf there); every other
  // form gets a separate SIMD pass here.
  const bool fused_check = !mx && p.num_matches < 0 && !opt.has_unmatched_cost && n == m && n > 0;
  if (!fused_check && !direct && n * m > 0 && kernels<T>().has_bad(c, n * m, mx ? inf : -inf)) locate_bad();
  for (int64_t i = 0; i < n; ++i) out[i] = -1;
  *total = 0.0;
  std::vector<T> work;
  std::vector<int32_t> sol;
  const char* forb = mx ? "-inf" : "+inf";
  try {
    if ((partial_k || partial_u) && padded) {  // the sink-padded square problem
      const int64_t k = p.num_matches;
      const int64_t s = partial_u ? n + m : n + m - k;
      if (s == 0) return;
      work.assign(static_cast<size_t>(s * s), T(0));
      for (int64_t i = 0; i < n; ++i) {
        T* wi = work.data() + i * s;
        const T* ci = c + i * m;
        for (int64_t j = 0; j < m; ++j) wi[j] = sgn * ci[j];
        if (partial_u) {
          for (int64_t j = m; j < s; ++j) wi[j] = inf;
          wi[m + i] = sgn * static_cast<T>(opt.unmatched_cost);
        }
      }
      for (int64_t r = n; r < s; ++r) {
        T* wr = work.data() + r * s;
        if (partial_u) {
          for (int64_t j = 0; j < m; ++j) wr[j] = inf;
          wr[r - n] = sgn * static_cast<T>(opt.unmatched_cost);
        } else {
          for (int64_t j = m; j < s; ++j) wr[j] = inf;  // dummy-dummy pairs are forbidden
        }
      }
      sol.resize(static_cast<size_t>(s));
      Core<T>(work.data(), static_cast<int>(s), static_cast<int>(s)).solve(sol.data());
      for (int64_t i = 0; i < n; ++i) out[i] = sol[i] < m ? sol[i] : -1;
    } else if (direct) {
      // Direct k-cardinality solve (KCardCore). k = min(n, m) is a complete assignment: the branches below (unless
      // the direct engine is forced, for tests).
      if (n == 0 || m == 0) return;
      const T* src = c;
      if (mx) {
        work.resize(static_cast<size_t>(n * m));
        for (int64_t t = 0; t < n * m; ++t) work[t] = -c[t];
        src = work.data();
      }
      // every entry is written by the transpose: no zero fill first (a std::vector's was 8 MB of memset per
      // 1024 x 1024 float64 solve, on top of the page faults)
      std::unique_ptr<T[]> tr(new T[static_cast<size_t>(n * m)]);
      constexpr int64_t tile = 32;  // cache-blocked transpose (a strided one was ~20% of a k = n / 4 solve)
      for (int64_t i0 = 0; i0 < n; i0 += tile)
        for (int64_t j0 = 0; j0 < m; j0 += tile)
          for (int64_t j = j0; j < std::min(m, j0 + tile); ++j)  // contiguous writes, strided reads
            for (int64_t i = i0; i < std::min(n, i0 + tile); ++i) tr[j * n + i] = src[i * m + j];
      const int64_t pairs = partial_u ? std::min(n, m) : p.num_matches;
      const T stop_at = partial_u ? T(2) * sgn * static_cast<T>(opt.unmatched_cost) : inf;
      sol.resize(static_cast<size_t>(n));
      try {
        KCardCore<T>(src, tr.get(), static_cast<int>(n), static_cast<int>(m)).solve(pairs, stop_at, sol.data());
      } catch (const BadEntry&) {
        locate_bad();
      }
      for (int64_t i = 0; i < n; ++i) out[i] = sol[i];
    } else if (n == 0 || m == 0) {
      return;
    } else if (n <= m) {
      const T* src = c;
      if (mx) {
        work.resize(static_cast<size_t>(n * m));
        for (int64_t t = 0; t < n * m; ++t) work[t] = -c[t];
        src = work.data();
      }
      sol.resize(static_cast<size_t>(n));
      try {
        Core<T>(src, static_cast<int>(n), static_cast<int>(m), fused_check).solve(sol.data());
      } catch (const BadEntry&) {
        locate_bad();
      }
      for (int64_t i = 0; i < n; ++i) out[i] = sol[i];
    } else {  // n > m: solve the transpose (m rows on n columns)
      work.resize(static_cast<size_t>(n * m));
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < m; ++j) work[j * n + i] = sgn * c[i * m + j];
      sol.resize(static_cast<size_t>(m));
      Core<T>(work.data(), static_cast<int>(m), static_cast<int>(n)).solve(sol.data());
      for (int64_t j = 0; j < m; ++j) out[sol[j]] = j;
    }
  } catch (const Infeasible&) {
    for (int64_t i = 0; i < n; ++i) out[i] = -1;
    std::string what = partial_k ? "no assignment of num_matches=" + std::to_string(p.num_matches) + " pairs"
                                 : std::string("no complete assignment");
    const std::string who = name == "cost" ? std::string() : name + ": ";
    throw std::invalid_argument(who + "cost matrix is infeasible: " + what + " avoids the forbidden (" + forb +
                                ") entries");
  }
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i)
    if (out[i] >= 0) acc += static_cast<double>(c[i * m + out[i]]);
  *total = acc;
}

}  // namespace

template <typename T>
void solve_batch(const std::vector<Problem>& problems, const Options& opt, int64_t* col_for_row, int64_t stride,
                 double* totals) {
  const int64_t B = static_cast<int64_t>(problems.size());
  // Largest problems first, so that dynamic scheduling does not leave one thread with the biggest at the end.
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  auto work = [&](int64_t b) {
    const Problem& p = problems[b];
    const bool partial = opt.has_unmatched_cost || p.num_matches >= 0;
    if (partial && opt.partial_engine != PartialEngine::kPadded) return double(p.n) * double(p.m);
    const double s = opt.has_unmatched_cost ? double(p.n + p.m) : p.num_matches >= 0 ? double(p.n + p.m - p.num_matches)
                                                                                     : double(std::max(p.n, p.m));
    return s * s;
  };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work(a) > work(b); });
  std::vector<std::string> errors(B);
  const int threads = std::max<int64_t>(1, std::min<int64_t>(opt.num_threads > 0 ? opt.num_threads :
#ifdef _OPENMP
                                                                                                  omp_get_max_threads()
#else
                                                                                                  1
#endif
                                                                                                  ,
                                                                 B));
  // One problem: no parallel region (its fork/join is a visible part of a 10 us solve).
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (B > 1)
  for (int64_t t = 0; t < B; ++t) {
    const int64_t b = order[t];
    const std::string name = B == 1 ? std::string("cost") : "cost[" + std::to_string(b) + "]";
    try {
      solve_one<T>(problems[b], opt, name, col_for_row + b * stride, totals + b);
    } catch (const std::exception& e) {
      errors[b] = e.what();
    } catch (...) {
      errors[b] = name + ": unknown error in the assignment solver";
    }
  }
  for (int64_t b = 0; b < B; ++b)
    if (!errors[b].empty()) throw std::invalid_argument(errors[b]);
}

template void solve_batch<float>(const std::vector<Problem>&, const Options&, int64_t*, int64_t, double*);
template void solve_batch<double>(const std::vector<Problem>&, const Options&, int64_t*, int64_t, double*);

std::string set_simd_level(const std::string& name) {
  const std::string before = simd_path();
  PF_CHECK(name == "auto" || name == "avx512" || name == "avx2" || name == "default",
           "simd level must be 'auto', 'avx512', 'avx2' or 'default'; got '", name, "'");
  forced_level.store(name == "auto" ? -1 : name == "avx512" ? 2 : name == "avx2" ? 1 : 0);
  return before;
}

std::string simd_path() {
  const int l = cpu_level();
  return l == 2 ? "avx512 (f, dq, vl, bw)" : l == 1 ? "avx2" : "default";
}

}  // namespace lsap
}  // namespace pyfusion
