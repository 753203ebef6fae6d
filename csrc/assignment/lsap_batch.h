// Batched exact linear assignment with one core for the CPU and the GPU (assignment_cuda.cu).
//
// Algorithm: the shortest-augmenting-path method of lsap.cpp (Jonker & Volgenant 1987): for square problems column
// reduction, reduction transfer and two rounds of augmenting row reduction (as lsap.cpp, with its step cap), for
// rectangular ones a greedy start (v = 0); then one Dijkstra search per free row over the reduced costs c_ij - v_j,
// dual update, path flip. Every O(m) step (validation, column reduction, the row scans of the transfer and of the
// row reduction, the Dijkstra scan with its argmin, the dual update, the reset) is split across the lanes of a
// *team*; the bookkeeping between steps runs on lane 0. There is no epsilon: the result is an
// optimal assignment up to floating-point rounding in the duals (as scipy's and lsap.cpp's), so the objective equals
// scipy's exactly for integer-valued costs (sums of integers below 2^53), and to rounding (~1e-15 relative) for
// real-valued ones. Ties among columns at the minimum distance are broken by a total order (free column first,
// then the smallest index), so the result does not depend on the team size or the reduction order.
//
// Teams: EmuTeam (CPU; W lanes run one after the other, same lane decomposition and reductions as the GPU: this is
// how the core is tested without a GPU), and in assignment_cuda.cu a warp (32 lanes, one problem per warp) or a
// block (256 lanes, one problem per block, for wide problems).
//
// Partial forms are virtual (no augmented matrix is built): num_matches = k solves the (n + m - k) square problem
// with zero-cost dummy rows/columns and forbidden dummy-dummy pairs; unmatched_cost = u solves the (n + m) problem
// where row i may take its own dummy column at cost u and column j its own dummy row. Maximisation negates costs.
// n > m (full form) is solved on the transpose, which the core writes into the workspace first.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__CUDACC__)
#define PF_HD __host__ __device__
#else
#define PF_HD
#endif

namespace pyfusion {
namespace lsap_batch {

enum StatusCode : int { kOk = 0, kNaN = 1, kBadInf = 2, kInfeasible = 3 };

struct Status {
  int code = kOk;
  int64_t where = -1;  // linear index i * m + j of the first bad entry (kNaN / kBadInf)
};

template <typename T>
PF_HD inline T pos_inf() {
  if (sizeof(T) == 8) {
    const uint64_t b = 0x7ff0000000000000ULL;
    double v;
    memcpy(&v, &b, sizeof(v));
    return static_cast<T>(v);
  }
  const uint32_t b = 0x7f800000u;
  float v;
  memcpy(&v, &b, sizeof(v));
  return static_cast<T>(v);
}

// One problem as the core sees it.
template <typename T>
struct ProblemView {
  const T* c = nullptr;  // n x m, row-major, contiguous
  int64_t n = 0, m = 0;
  int64_t num_matches = -1;  // < 0: complete assignment
};

struct Options {
  bool maximize = false;
  bool has_unmatched_cost = false;
  double unmatched_cost = 0.0;
};

// Workspace of one problem: `cols` = columns of the solved matrix, `rows` = its rows, `tr` = n * m elements when the
// full problem has n > m (transpose), else 0.
template <typename T>
struct Workspace {
  T *v, *d, *pen, *done_d, *done_v, *tr;
  int32_t *pred, *row4col, *col4row, *done_j, *argrow;
};

// Sizes of the solved matrix (rows <= cols) and of the workspace, in elements.
struct Shape {
  int64_t rows = 0, cols = 0, tr = 0;
};

template <typename T>
PF_HD inline Shape solved_shape(const ProblemView<T>& p, const Options& o) {
  Shape s;
  if (o.has_unmatched_cost) {
    s.rows = s.cols = p.n + p.m;
  } else if (p.num_matches >= 0) {
    s.rows = s.cols = p.n + p.m - p.num_matches;
  } else if (p.n <= p.m) {
    s.rows = p.n;
    s.cols = p.m;
  } else {
    s.rows = p.m;
    s.cols = p.n;
    s.tr = p.n * p.m;
  }
  return s;
}

// Workspace bytes of one problem, 16-byte aligned pieces.
template <typename T>
PF_HD inline int64_t workspace_bytes(const Shape& s) {
  auto al = [](int64_t b) { return (b + 15) / 16 * 16; };
  return 5 * al(s.cols * static_cast<int64_t>(sizeof(T))) + al(s.tr * static_cast<int64_t>(sizeof(T))) +
         4 * al(s.cols * 4) + al(s.rows * 4);
}

template <typename T>
PF_HD inline Workspace<T> carve(char* base, const Shape& s) {
  auto al = [](int64_t b) { return (b + 15) / 16 * 16; };
  Workspace<T> w;
  const int64_t tc = al(s.cols * static_cast<int64_t>(sizeof(T))), ic = al(s.cols * 4);
  w.v = reinterpret_cast<T*>(base);
  w.d = reinterpret_cast<T*>(base + tc);
  w.pen = reinterpret_cast<T*>(base + 2 * tc);
  w.done_d = reinterpret_cast<T*>(base + 3 * tc);
  w.done_v = reinterpret_cast<T*>(base + 4 * tc);
  char* q = base + 5 * tc;
  w.tr = reinterpret_cast<T*>(q);
  q += al(s.tr * static_cast<int64_t>(sizeof(T)));
  w.pred = reinterpret_cast<int32_t*>(q);
  w.row4col = reinterpret_cast<int32_t*>(q + ic);
  w.done_j = reinterpret_cast<int32_t*>(q + 2 * ic);
  w.argrow = reinterpret_cast<int32_t*>(q + 3 * ic);
  w.col4row = reinterpret_cast<int32_t*>(q + 4 * ic);
  return w;
}

// The best column of a Dijkstra step: smallest distance, then a free column, then the smallest index (a total
// order: min over any partition and reduction order gives the same column).
template <typename T>
struct Best {
  T val;
  int32_t idx;  // -1: none
  int32_t busy;  // 0 free column, 1 assigned
  PF_HD static Best none() { return Best{pos_inf<T>(), -1, 1}; }
  PF_HD bool better(const Best& o) const {
    if (o.idx < 0) return idx >= 0;
    if (idx < 0) return false;
    if (val != o.val) return val < o.val;
    if (busy != o.busy) return busy < o.busy;
    return idx < o.idx;
  }
};

template <typename T>
struct BestMin {
  PF_HD Best<T> operator()(const Best<T>& a, const Best<T>& b) const { return a.better(b) ? a : b; }
};
// The two smallest (value, index) pairs of a row scan, ordered by value then index (lsap.cpp's min2 order).
template <typename T>
struct Best2 {
  T u1, u2;
  int32_t j1, j2;  // -1: none
  PF_HD static Best2 none() { return Best2{pos_inf<T>(), pos_inf<T>(), -1, -1}; }
};

template <typename T>
PF_HD inline bool before(T a, int32_t ia, T b, int32_t ib) {
  if (ib < 0) return ia >= 0;
  if (ia < 0) return false;
  return a < b || (a == b && ia < ib);
}

template <typename T>
struct Best2Min {
  PF_HD Best2<T> operator()(const Best2<T>& a, const Best2<T>& b) const {
    Best2<T> r = a;
    push(r, b.u1, b.j1);
    push(r, b.u2, b.j2);
    return r;
  }
  PF_HD static void push(Best2<T>& r, T h, int32_t j) {
    if (j < 0) return;
    if (before(h, j, r.u1, r.j1)) {
      r.u2 = r.u1;
      r.j2 = r.j1;
      r.u1 = h;
      r.j1 = j;
    } else if (before(h, j, r.u2, r.j2)) {
      r.u2 = h;
      r.j2 = j;
    }
  }
};

struct MinI64 {
  PF_HD int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};
struct SumF64 {
  PF_HD double operator()(double a, double b) const { return a + b; }
};
struct SumI64 {
  PF_HD int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};

// The matrix the core solves: the (signed) cost, its transpose, or a sink-augmented partial form, read on the fly.
template <typename T>
struct Cost {
  const T* c;     // original n x m, or the signed transpose (m x n) when `transposed`
  int64_t n, m;   // original sizes
  int mode;       // 0 full, 1 transposed full, 2 num_matches, 3 unmatched_cost
  T sign, u;      // u: signed unmatched cost
  PF_HD T operator()(int64_t i, int64_t j) const {
    const T inf = pos_inf<T>();
    switch (mode) {
      case 0:
        return sign * c[i * m + j];
      case 1:
        return c[i * n + j];  // already signed
      case 2:
        if (i < n) return j < m ? sign * c[i * m + j] : T(0);
        return j < m ? T(0) : inf;
      default:
        if (i < n) return j < m ? sign * c[i * m + j] : (j - m == i ? u : inf);
        return j < m ? (i - n == j ? u : inf) : T(0);
    }
  }
};

// CPU team: W lanes run in turn. Same decomposition (lane l owns indices l, l + W, ...) and reductions as the GPU.
struct EmuTeam {
  int W = 32;
  int lanes() const { return W; }
  template <typename F>
  void each(F f) const {
    for (int l = 0; l < W; ++l) f(l);
  }
  void sync() const {}
  template <typename F>
  void single(F f) const {
    f();
  }
  template <typename R, typename F, typename Op>
  R reduce(F f, Op op) const {
    R acc = f(0);
    for (int l = 1; l < W; ++l) acc = op(acc, f(l));
    return acc;
  }
};

// min2 of row i over the reduced costs c_ij - v_j (a team scan).
template <typename T, typename Team>
PF_HD inline Best2<T> row_min2(const Team& team, const Cost<T>& cost, int64_t i, int64_t C, const T* v) {
  const int W = team.lanes();
  return team.template reduce<Best2<T>>(
      [&](int l) {
        Best2<T> b = Best2<T>::none();
        for (int64_t j = l; j < C; j += W) Best2Min<T>::push(b, cost(i, j) - v[j], static_cast<int32_t>(j));
        return b;
      },
      Best2Min<T>());
}

// lsap.cpp's reduction transfer and two rounds of augmenting row reduction after the column reduction (square
// problems). matches[i] = columns whose minimum is row i. Leaves the free rows for the Dijkstra phase. Returns false
// if a row has only forbidden entries (infeasible). argrow and done_j serve as the two free-row lists.
template <typename T, typename Team>
PF_HD bool jv_reduce(const Team& team, const Cost<T>& cost, int64_t n, Workspace<T> w, const int32_t* matches) {
  const T inf = pos_inf<T>();
  const int W = team.lanes();
  const int64_t nfree0 = team.template reduce<int64_t>(
      [&](int l) {
        int64_t c = 0;
        for (int64_t i = l; i < n; i += W) c += matches[i] == 0;
        return c;
      },
      SumI64());
  // Reduction transfer (skipped when fewer than n/16 rows are free, as lsap.cpp: it only helps the row reduction).
  if (nfree0 * 16 >= n) {
    for (int64_t i = 0; i < n; ++i) {
      if (matches[i] != 1) continue;
      const int32_t j1 = w.col4row[i];
      const Best2<T> b = row_min2<T>(team, cost, i, n, w.v);
      const T mn = b.j1 == j1 ? b.u2 : b.u1;
      if (mn < inf) {
        team.single([&] { w.v[j1] -= mn; });
      }
    }
  }
  // The free rows, in increasing order, into list 0 (argrow); list 1 (done_j, after matches is read) collects the
  // rows to retry in the next round.
  int32_t* lists[2] = {w.argrow, w.done_j};
  int64_t ncur = 0;
  team.single([&] {
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i)
      if (matches[i] == 0) w.argrow[c++] = static_cast<int32_t>(i);
  });
  ncur = nfree0;
  int64_t budget = 8 * n + 64;  // guards against float absorption cycles (v[j1] - delta == v[j1]), as lsap.cpp
  int which = 0;
  for (int round = 0; round < 2 && ncur > 0; ++round) {
    int32_t* cur = lists[which];
    int32_t* next = lists[1 - which];
    int64_t nnext = 0, k = 0;
    while (k < ncur) {
      if (--budget < 0) {
        const int64_t from = k, count = ncur - k, at = nnext;
        team.single([&] {
          for (int64_t t = 0; t < count; ++t) next[at + t] = cur[from + t];
        });
        nnext += count;
        break;
      }
      const int32_t i = cur[k++];
      const Best2<T> b = row_min2<T>(team, cost, i, n, w.v);
      if (!(b.u1 < inf)) return false;  // every entry of row i is forbidden
      int32_t j1 = b.j1;
      int32_t i0 = w.row4col[j1];
      const T vj1 = w.v[j1];
      const T lowered = b.u2 < inf ? vj1 - (b.u2 - b.u1) : vj1;
      const bool strict = lowered < vj1;
      if (!strict && i0 >= 0 && b.j2 >= 0 && b.u2 < inf) {
        j1 = b.j2;  // a tie: take the second column and avoid kicking out the same row back and forth
        i0 = w.row4col[j1];
      }
      const int64_t slot_k = k, slot_next = nnext;
      team.single([&] {
        if (strict) w.v[j1] = lowered;
        if (i0 >= 0) w.col4row[i0] = -1;
        w.col4row[i] = j1;
        w.row4col[j1] = i;
        if (i0 >= 0) {
          if (strict) {
            cur[slot_k - 1] = i0;  // the price went down: retry the evicted row at once
          } else {
            next[slot_next] = i0;
          }
        }
      });
      if (i0 >= 0) {
        if (strict) {
          --k;
        } else {
          ++nnext;
        }
      }
    }
    ncur = nnext;
    which = 1 - which;
  }
  return true;
}

// Solves one problem with `team`; writes col_for_row (n entries, -1 unmatched), the total of the matched original
// entries, and the status. All lanes of the team call it with the same arguments.
template <typename T, typename Team>
PF_HD void solve_one(const Team& team, const ProblemView<T>& p, const Options& o, Workspace<T> w, int64_t* out,
                     double* total, Status* status) {
  const T inf = pos_inf<T>();
  const int W = team.lanes();
  const bool mx = o.maximize;
  const T bad_inf = mx ? inf : -inf;
  const int64_t nm = p.n * p.m;
  // 1. Validation: the first NaN or infinity of the wrong sign (smallest linear index).
  const int64_t bad = team.template reduce<int64_t>(
      [&](int l) {
        int64_t first = nm;
        for (int64_t t = l; t < nm; t += W) {
          const T x = p.c[t];
          if ((x != x || x == bad_inf) && t < first) first = t;
        }
        return first;
      },
      MinI64());
  team.each([&](int l) {
    for (int64_t i = l; i < p.n; i += W) out[i] = -1;
  });
  if (bad < nm) {
    team.single([&] {
      const T x = p.c[bad];
      status->code = x != x ? kNaN : kBadInf;
      status->where = bad;
      *total = 0.0;
    });
    return;
  }
  const Shape s = solved_shape(p, o);
  const int64_t R = s.rows, C = s.cols;
  if (R == 0) {
    team.single([&] {
      status->code = kOk;
      *total = 0.0;
    });
    return;
  }
  Cost<T> cost{p.c, p.n, p.m, 0, mx ? T(-1) : T(1), static_cast<T>((mx ? -1.0 : 1.0) * o.unmatched_cost)};
  if (o.has_unmatched_cost) {
    cost.mode = 3;
  } else if (p.num_matches >= 0) {
    cost.mode = 2;
  } else if (s.tr > 0) {
    // n > m: write the signed transpose (m x n) and solve it (every original column gets a row).
    team.each([&](int l) {
      for (int64_t t = l; t < nm; t += W) {
        const int64_t jj = t / p.n, ii = t - jj * p.n;
        w.tr[t] = cost.sign * p.c[ii * p.m + jj];
      }
    });
    team.sync();
    cost.c = w.tr;
    cost.mode = 1;
  }
  // 2. Start: v, assignment.
  team.each([&](int l) {
    for (int64_t j = l; j < C; j += W) {
      w.row4col[j] = -1;
      w.d[j] = inf;
      w.pred[j] = -1;
      w.v[j] = T(0);
    }
    for (int64_t i = l; i < R; i += W) w.col4row[i] = -1;
  });
  team.sync();
  bool infeasible = false;
  if (R == C) {
    // Column reduction: v_j = min_i c_ij (first minimum), then each row takes the last column it is the minimum of
    // (the column loop runs downwards as in lsap.cpp).
    team.each([&](int l) {
      for (int64_t j = l; j < C; j += W) {
        T best = inf;
        int32_t arg = 0;
        for (int64_t i = 0; i < R; ++i) {
          const T x = cost(i, j);
          if (x < best) {
            best = x;
            arg = static_cast<int32_t>(i);
          }
        }
        w.v[j] = best;
        w.argrow[j] = arg;
      }
    });
    team.sync();
    const int64_t empty = team.template reduce<int64_t>(
        [&](int l) {
          int64_t first = C;
          for (int64_t j = l; j < C; j += W)
            if (!(w.v[j] < inf) && j < first) first = j;
          return first;
        },
        MinI64());
    if (empty < C) {
      infeasible = true;
    } else {
      // Each row takes the last column it is the minimum of; matches[i] counts them (done_j is free until the
      // Dijkstra phase and serves as the count).
      int32_t* matches = w.done_j;
      team.each([&](int l) {
        for (int64_t ii = l; ii < R; ii += W) matches[ii] = 0;
      });
      team.sync();
      team.single([&] {
        for (int64_t j = C - 1; j >= 0; --j) {
          const int32_t i = w.argrow[j];
          if (++matches[i] == 1) {
            w.col4row[i] = static_cast<int32_t>(j);
            w.row4col[j] = i;
          }
        }
      });
      infeasible = !jv_reduce<T>(team, cost, R, w, matches);
    }
  } else {
    // Rectangular start (v = 0): a row whose cheapest column is still free takes it.
    for (int64_t i = 0; i < R; ++i) {
      const Best<T> b = team.template reduce<Best<T>>(
          [&](int l) {
            Best<T> bb = Best<T>::none();
            for (int64_t j = l; j < C; j += W) {
              const Best<T> cand{cost(i, j), static_cast<int32_t>(j), 0};
              if (cand.val < inf && cand.better(bb)) bb = cand;
            }
            return bb;
          },
          BestMin<T>());
      if (b.idx >= 0) {
        team.single([&] {
          if (w.row4col[b.idx] < 0) {
            w.row4col[b.idx] = static_cast<int32_t>(i);
            w.col4row[i] = b.idx;
          }
        });
      }
    }
  }
  team.each([&](int l) {
    for (int64_t j = l; j < C; j += W) w.pen[j] = w.row4col[j] < 0 ? T(0) : inf;
  });
  team.sync();
  // 3. One Dijkstra search per free row.
  for (int64_t f = 0; f < R && !infeasible; ++f) {
    if (w.col4row[f] >= 0) continue;
    int64_t ndone = 0;
    T h = T(0);
    int64_t i = f;
    int32_t j = -1;
    T dmin = T(0);
    while (true) {
      const int64_t row = i;
      const T hh = h;
      const Best<T> b = team.template reduce<Best<T>>(
          [&](int l) {
            Best<T> bb = Best<T>::none();
            for (int64_t jj = l; jj < C; jj += W) {
              // Final columns have v = -inf: c - v = +inf, never lower than d, never picked (d = +inf).
              const T nd = cost(row, jj) - w.v[jj] - hh;
              if (nd < w.d[jj]) {
                w.d[jj] = nd;
                w.pred[jj] = static_cast<int32_t>(row);
              }
              if (w.d[jj] < inf) {
                const Best<T> cand{w.d[jj], static_cast<int32_t>(jj), w.pen[jj] == T(0) ? 0 : 1};
                if (cand.better(bb)) bb = cand;
              }
            }
            return bb;
          },
          BestMin<T>());
      if (b.idx < 0) {
        infeasible = true;
        break;
      }
      j = b.idx;
      dmin = b.val;
      const int64_t slot = ndone;
      team.single([&] {
        w.done_j[slot] = j;
        w.done_d[slot] = dmin;
        w.done_v[slot] = w.v[j];
        w.v[j] = -inf;
        w.d[j] = inf;
      });
      ++ndone;
      const int32_t i2 = w.row4col[j];
      if (i2 < 0) break;
      h = cost(i2, j) - w.done_v[slot] - dmin;
      i = i2;
    }
    if (infeasible) break;
    const T dm = dmin;
    team.each([&](int l) {
      for (int64_t t = l; t < ndone; t += W) w.v[w.done_j[t]] = w.done_v[t] + (w.done_d[t] - dm);
      for (int64_t jj = l; jj < C; jj += W) w.d[jj] = inf;
    });
    team.sync();
    const int64_t root = f;
    team.single([&] {
      int32_t jj = j;
      w.pen[jj] = inf;  // the sink column is assigned from now on
      while (true) {
        const int32_t ip = w.pred[jj];
        w.row4col[jj] = ip;
        const int32_t prev = w.col4row[ip];
        w.col4row[ip] = jj;
        jj = prev;
        if (ip == root) break;
      }
    });
  }
  if (infeasible) {
    team.single([&] {
      status->code = kInfeasible;
      status->where = -1;
      *total = 0.0;
    });
    return;
  }
  // 4. Result in the original problem's terms.
  if (cost.mode == 1) {
    team.each([&](int l) {
      for (int64_t jj = l; jj < p.m; jj += W) out[w.col4row[jj]] = jj;
    });
  } else {
    team.each([&](int l) {
      for (int64_t ii = l; ii < p.n; ii += W) {
        const int32_t cc = w.col4row[ii];
        out[ii] = cc >= 0 && cc < p.m ? cc : -1;
      }
    });
  }
  team.sync();
  const double tot = team.template reduce<double>(
      [&](int l) {
        double acc = 0.0;
        for (int64_t ii = l; ii < p.n; ii += W)
          if (out[ii] >= 0) acc += static_cast<double>(p.c[ii * p.m + out[ii]]);
        return acc;
      },
      SumF64());
  team.single([&] {
    status->code = kOk;
    *total = tot;
  });
}

// Host API. Problems of one dtype; col_for_row: B x stride int64; totals: B doubles. Throws std::invalid_argument
// with lsap.cpp's messages on NaN, an infinity of the wrong sign, or an infeasible problem.
template <typename T>
void solve_batch_emulated(const std::vector<ProblemView<T>>& problems, const Options& opt, int team_lanes,
                          int64_t* col_for_row, int64_t stride, double* totals);

// The message lsap.cpp raises for a failed problem (name: "cost" for a single problem, else "cost[b]").
std::string status_message(const Status& st, const std::string& name, int64_t m, bool maximize, int64_t num_matches);

#ifdef PYFUSION_HAS_CUDA
// Same on the GPU: `problems[b].c` are device pointers, outputs are device pointers; queued on `stream`, then the
// statuses are copied back (the call synchronises the stream) and failures raise as above. Throws
// std::runtime_error when no CUDA device / driver is usable.
template <typename T>
void solve_batch_cuda(const std::vector<ProblemView<T>>& problems, const Options& opt, int64_t* col_for_row,
                      int64_t stride, double* totals, void* stream);
#endif

}  // namespace lsap_batch
}  // namespace pyfusion
