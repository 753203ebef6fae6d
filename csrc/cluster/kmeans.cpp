// Weighted k-means with randomized-Ward / k-means++ starts in kernel form; see kmeans.h for the math.
#include "cluster/kmeans.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"

namespace pyfusion::cluster {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// splitmix64 (Steele, Lea, Flood 2014): turns (seed, restart) into well-mixed xoshiro state.
inline uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// xoshiro256** (Blackman & Vigna 2018): small, fast, and identical on every platform, unlike
// std::uniform_real_distribution whose output is implementation-defined.
class Rng {
 public:
  Rng(uint64_t seed, uint64_t stream) {
    uint64_t x = seed;
    uint64_t mixed = splitmix64(x) ^ (stream * 0xD1B54A32D192ED03ULL + 0x8CB92BA72F3D8DD7ULL);
    for (auto& s : s_) s = splitmix64(mixed);
  }
  uint64_t next() {
    const uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

// The hot loops are compiled for AVX-512, AVX2 and baseline x86-64 (chosen at load time), all with
// fp-contract=off: the AVX-512 clone would otherwise fuse multiply-adds, and results (hence, on near
// ties, the clustering) would differ in the last bits between CPUs with and without AVX-512.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PF_HOT __attribute__((target_clones("avx512f", "avx2", "default"), optimize("fp-contract=off")))
#else
#define PF_HOT
#endif
PF_HOT double dot(const double* a, const double* b, int64_t n) {
  // Eight independent partial sums: the compiler may vectorize them without reassociating (no
  // -ffast-math), and the summation order, hence the result, is the same for every clone.
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int q = 0; q < 8; ++q) acc[q] += a[i + q] * b[i + q];
  double s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Data shared (read-only) by every restart.
struct Problem {
  int64_t d = 0;
  int64_t k = 0;
  const double* g = nullptr;  // centred Gram (D, D)
  const double* w = nullptr;  // weights (D,)
  std::vector<double> gdiag;  // G_ii
  std::vector<double> gw;     // w_j G_ij (D, D)
  std::vector<double> d2;     // pairwise squared distances (D, D)
  std::vector<double> row_min0;  // initial Ward row minima (squared cost), same for every restart
  std::vector<int64_t> row_arg0;
  double tol = 0.0;  // absolute tolerance on distance comparisons (scale of the data)
};

// Per-thread scratch space, allocated once and reused by every restart the thread runs.
struct Workspace {
  explicit Workspace(const Problem& p)
      : d2(static_cast<size_t>(p.d * p.d)),
        wc(p.d),
        active(p.d),
        row_min(p.d),
        row_arg(p.d),
        nxt(p.d),
        tail(p.d),
        labels(p.d),
        best_dist(p.d),
        closest(p.d),
        t(static_cast<size_t>(p.d * p.k)),
        wk(p.k),
        pk(p.k),
        cnt(p.k),
        centers(p.k),
        inv_w(p.k),
        q(p.k),
        row(p.k),
        start(p.k + 1),
        fill(p.k),
        order(p.d),
        next_label(p.d),
        wbuf(p.d),
        cbuf(p.d) {}
  std::vector<double> d2, wc;
  std::vector<char> active;
  std::vector<double> row_min;
  std::vector<int64_t> row_arg, nxt, tail, labels;
  std::vector<double> best_dist, closest;
  std::vector<double> t, wk, pk;
  std::vector<int64_t> cnt, centers;
  std::vector<double> inv_w, q, row;
  std::vector<int64_t> start, fill, order, next_label;
  std::vector<double> wbuf, cbuf;  // Ward row costs; costs of the merged cluster's column
};

// Squared Ward cost 2 w_a w_b / (w_a + w_b) d2_ab (= scipy's Ward distance squared).
inline double ward_cost2(double wa, double wb, double d2) { return 2.0 * wa * wb / (wa + wb) * d2; }

// Row a's cheapest partner b > a. Merged-away clusters have d2 = inf, so no activity test is needed and
// the cost loop is branch-free (it vectorizes, divisions included); the argmin is a separate scan.
PF_HOT void ward_row(const Problem& p, Workspace& ws, int64_t a) {
  const int64_t d = p.d;
  const double wa = ws.wc[a];
  const double* row = ws.d2.data() + a * d;
  const double* wc = ws.wc.data();
  double* buf = ws.wbuf.data();
  for (int64_t b = a + 1; b < d; ++b) buf[b] = ward_cost2(wa, wc[b], row[b]);
  double best = kInf;
  int64_t arg = -1;
  for (int64_t b = a + 1; b < d; ++b) {
    if (buf[b] < best) {
      best = buf[b];
      arg = b;
    }
  }
  ws.row_min[a] = best;
  ws.row_arg[a] = arg;
}

// Randomized Ward (StochHierarchical): merge until k clusters remain; writes ws.labels.
void randomized_ward(const Problem& p, Workspace& ws, Rng& rng, int64_t top_k) {
  const int64_t d = p.d;
  std::copy(p.d2.begin(), p.d2.end(), ws.d2.begin());
  std::copy(p.row_min0.begin(), p.row_min0.end(), ws.row_min.begin());
  std::copy(p.row_arg0.begin(), p.row_arg0.end(), ws.row_arg.begin());
  for (int64_t a = 0; a < d; ++a) {
    ws.wc[a] = p.w[a];
    ws.active[a] = 1;
    ws.nxt[a] = -1;
    ws.tail[a] = a;
  }
  std::vector<double> cand_cost(static_cast<size_t>(top_k));
  std::vector<int64_t> cand(static_cast<size_t>(top_k));
  std::vector<double> prob(static_cast<size_t>(top_k));
  for (int64_t m = d; m > p.k; --m) {
    // Candidates: the top_k smallest row minima (each row holds its cheapest partner b > a), sorted
    // by (cost, row) so that the choice is reproducible.
    int64_t nc = 0;
    for (int64_t a = 0; a < d; ++a) {
      if (!ws.active[a] || ws.row_arg[a] < 0) continue;
      const double c = ws.row_min[a];
      if (nc == top_k && !(c < cand_cost[nc - 1])) continue;
      int64_t pos = nc < top_k ? nc++ : nc - 1;
      while (pos > 0 && c < cand_cost[pos - 1]) {
        cand_cost[pos] = cand_cost[pos - 1];
        cand[pos] = cand[pos - 1];
        --pos;
      }
      cand_cost[pos] = c;
      cand[pos] = a;
    }
    int64_t chosen = 0;
    if (nc > 1) {
      // Probabilities exp(-(c - c_min) / mean(c - c_min)) on the Ward distances c (not squared), as
      // in the reference; equal costs (mean 0) give a uniform choice.
      double cmin = std::sqrt(cand_cost[0]);
      double scale = 0.0;
      for (int64_t q = 0; q < nc; ++q) scale += std::sqrt(cand_cost[q]) - cmin;
      scale /= static_cast<double>(nc);
      double total = 0.0;
      for (int64_t q = 0; q < nc; ++q) {
        prob[q] = scale > 0.0 ? std::exp(-(std::sqrt(cand_cost[q]) - cmin) / scale) : 1.0;
        total += prob[q];
      }
      double u = rng.uniform() * total;
      chosen = nc - 1;
      for (int64_t q = 0; q < nc; ++q) {
        if (u < prob[q]) {
          chosen = q;
          break;
        }
        u -= prob[q];
      }
    }
    const int64_t i = cand[chosen];
    const int64_t j = ws.row_arg[i];  // j > i: cluster j is merged into cluster i
    const double wi = ws.wc[i], wj = ws.wc[j], wn = wi + wj;
    const double dij = ws.d2[i * d + j];
    const double corr = wi * wj * dij / (wn * wn);
    double* rowi = ws.d2.data() + i * d;
    double* rowj = ws.d2.data() + j * d;
    // Lance-Williams for centroids: ||mu_{i+j} - mu_r||^2, exact for squared Euclidean distances;
    // inactive r stay at inf. Row first (contiguous, vectorizes), then the symmetric column.
    for (int64_t r = 0; r < d; ++r) rowi[r] = std::max((wi * rowi[r] + wj * rowj[r]) / wn - corr, 0.0);
    rowi[i] = 0.0;
    rowi[j] = kInf;
    for (int64_t r = 0; r < d; ++r) {
      ws.d2[r * d + i] = rowi[r];
      ws.d2[r * d + j] = kInf;
      rowj[r] = kInf;
    }
    ws.wc[i] = wn;
    ws.active[j] = 0;
    ws.row_min[j] = kInf;
    ws.row_arg[j] = -1;
    ws.nxt[ws.tail[i]] = j;
    ws.tail[i] = ws.tail[j];
    ward_row(p, ws, i);
    double* buf = ws.cbuf.data();
    const double* wc = ws.wc.data();
    for (int64_t r = 0; r < i; ++r) buf[r] = ward_cost2(wc[r], wn, rowi[r]);
    for (int64_t r = 0; r < i; ++r) {
      if (ws.row_arg[r] < 0) continue;  // inactive (or no partner left)
      if (ws.row_arg[r] == i || ws.row_arg[r] == j) {
        ward_row(p, ws, r);
      } else if (buf[r] < ws.row_min[r] || (buf[r] == ws.row_min[r] && i < ws.row_arg[r])) {
        ws.row_min[r] = buf[r];
        ws.row_arg[r] = i;
      }
    }
    for (int64_t r = i + 1; r < j; ++r) {
      if (ws.row_arg[r] == j) ward_row(p, ws, r);
    }
  }
  int64_t label = 0;
  for (int64_t a = 0; a < d; ++a) {
    if (!ws.active[a]) continue;
    for (int64_t q = a; q >= 0; q = ws.nxt[q]) ws.labels[q] = label;
    ++label;
  }
}

// Weighted greedy k-means++: D^2 sampling with 2 + floor(ln k) local trials per center (as scikit-learn).
void kmeans_pp(const Problem& p, Workspace& ws, Rng& rng) {
  const int64_t d = p.d, k = p.k;
  const int64_t trials = 2 + static_cast<int64_t>(std::log(static_cast<double>(k)));
  auto sample = [&](const double* mass, double total) {
    double u = rng.uniform() * total;
    int64_t last = -1;
    for (int64_t i = 0; i < d; ++i) {
      if (mass[i] <= 0.0) continue;
      last = i;
      if (u < mass[i]) return i;
      u -= mass[i];
    }
    return last;  // rounding left u >= 0 at the end
  };
  double wsum = 0.0;
  for (int64_t i = 0; i < d; ++i) wsum += p.w[i];
  ws.centers[0] = sample(p.w, wsum);
  for (int64_t i = 0; i < d; ++i) ws.closest[i] = p.d2[ws.centers[0] * d + i];
  for (int64_t c = 1; c < k; ++c) {
    double pot = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      ws.best_dist[i] = p.w[i] * ws.closest[i];
      pot += ws.best_dist[i];
    }
    int64_t best = -1;
    if (pot <= 0.0) {
      // Every point sits on a center (duplicates): any point will do; Lloyd handles the empty cluster.
      best = static_cast<int64_t>(rng.uniform() * static_cast<double>(d));
    } else {
      double best_pot = kInf;
      for (int64_t t = 0; t < trials; ++t) {
        const int64_t cand = sample(ws.best_dist.data(), pot);
        const double* row = p.d2.data() + cand * d;
        double np = 0.0;
        for (int64_t i = 0; i < d; ++i) np += p.w[i] * std::min(ws.closest[i], row[i]);
        if (np < best_pot) {
          best_pot = np;
          best = cand;
        }
      }
    }
    ws.centers[c] = best;
    const double* row = p.d2.data() + best * d;
    for (int64_t i = 0; i < d; ++i) ws.closest[i] = std::min(ws.closest[i], row[i]);
  }
  for (int64_t i = 0; i < d; ++i) {
    double bd = kInf;
    int64_t bc = 0;
    for (int64_t c = 0; c < k; ++c) {
      const double v = p.d2[ws.centers[c] * d + i];
      if (v < bd) {
        bd = v;
        bc = c;
      }
    }
    ws.labels[i] = bc;
  }
}

// 1 / W_c and q_c = P_c / W_c^2, so that ||x_i - mu_c||^2 = G_ii - 2 T_ic / W_c + q_c needs no division.
// An empty cluster gets q = inf: it is never the nearest.
inline void refresh_cluster(Workspace& ws, int64_t c) {
  if (ws.cnt[c] > 0) {
    ws.inv_w[c] = 1.0 / ws.wk[c];
    ws.q[c] = ws.pk[c] * ws.inv_w[c] * ws.inv_w[c];
  } else {
    ws.inv_w[c] = 0.0;
    ws.q[c] = kInf;
  }
}

// T_ic = sum_{j in c} w_j G_ij, W_c, P_c = sum_{i in c} w_i T_ic and counts, exactly from ws.labels.
// Members are gathered per cluster (counting sort) so each T_ic is a register sum; the scatter form
// (T_i,label(j) += ...) was the top hotspot in perf (store-to-load chains; D = 200, k = 150).
void cluster_stats(const Problem& p, Workspace& ws) {
  const int64_t d = p.d, k = p.k;
  std::fill(ws.wk.begin(), ws.wk.end(), 0.0);
  std::fill(ws.cnt.begin(), ws.cnt.end(), 0);
  for (int64_t j = 0; j < d; ++j) {
    ws.wk[ws.labels[j]] += p.w[j];
    ws.cnt[ws.labels[j]] += 1;
  }
  ws.start[0] = 0;
  for (int64_t c = 0; c < k; ++c) ws.start[c + 1] = ws.start[c] + ws.cnt[c];
  for (int64_t c = 0; c < k; ++c) ws.fill[c] = ws.start[c];
  for (int64_t j = 0; j < d; ++j) ws.order[ws.fill[ws.labels[j]]++] = j;
  for (int64_t i = 0; i < d; ++i) {
    const double* gw = p.gw.data() + i * d;
    double* ti = ws.t.data() + i * k;
    for (int64_t c = 0; c < k; ++c) {
      double acc = 0.0;
      for (int64_t q = ws.start[c]; q < ws.start[c + 1]; ++q) acc += gw[ws.order[q]];
      ti[c] = acc;
    }
  }
  for (int64_t c = 0; c < k; ++c) {
    double acc = 0.0;
    for (int64_t q = ws.start[c]; q < ws.start[c + 1]; ++q) acc += p.w[ws.order[q]] * ws.t[ws.order[q] * k + c];
    ws.pk[c] = acc;
    refresh_cluster(ws, c);
  }
}

// Move point i from cluster a to cluster b, updating T, P, W exactly in O(D):
// P_a -= 2 w_i T_ia - w_i^2 G_ii (T_ia includes i), P_b += 2 w_i T_ib + w_i^2 G_ii, T_:a -= w_i G_:i, T_:b += w_i G_:i.
void move_point(const Problem& p, Workspace& ws, int64_t i, int64_t a, int64_t b) {
  const int64_t d = p.d, k = p.k;
  const double wi = p.w[i], gii = p.gdiag[i];
  ws.pk[a] += -2.0 * wi * ws.t[i * k + a] + wi * wi * gii;
  ws.pk[b] += 2.0 * wi * ws.t[i * k + b] + wi * wi * gii;
  const double* gi = p.g + i * d;  // G is symmetric: row i is column i
  ws.wk[a] -= wi;
  ws.wk[b] += wi;
  ws.cnt[a] -= 1;
  ws.cnt[b] += 1;
  if (ws.cnt[a] == 0) {
    // Clear the rounding residue, so that a point joining the cluster later starts from exact zeros.
    for (int64_t q = 0; q < d; ++q) ws.t[q * k + a] = 0.0;
    ws.wk[a] = 0.0;
    ws.pk[a] = 0.0;
  } else {
    for (int64_t q = 0; q < d; ++q) ws.t[q * k + a] -= wi * gi[q];
  }
  for (int64_t q = 0; q < d; ++q) ws.t[q * k + b] += wi * gi[q];
  ws.labels[i] = b;
  refresh_cluster(ws, a);
  refresh_cluster(ws, b);
}

// buf_c = ||x_i - mu_c||^2 - G_ii = q_c - 2 T_ic / W_c: branch-free, so that it vectorizes.
PF_HOT void centroid_dists(const double* q, const double* inv_w, const double* ti, double* buf, int64_t k) {
  for (int64_t c = 0; c < k; ++c) buf[c] = q[c] - 2.0 * ti[c] * inv_w[c];
}

// Lloyd iterations to a fixed point (at most max_iter assignment steps). Each step assigns every point
// to its nearest centroid under the current labels, then applies the moves one by one (move_point), which
// gives the statistics of the new labels in O(D * moves) instead of O(D^2).
void lloyd(const Problem& p, Workspace& ws, int64_t max_iter) {
  const int64_t d = p.d, k = p.k;
  cluster_stats(p, ws);
  double* buf = ws.row.data();
  for (int64_t it = 0; it < max_iter; ++it) {
    int64_t changed = 0;
    for (int64_t i = 0; i < d; ++i) {
      const double* ti = ws.t.data() + i * k;
      centroid_dists(ws.q.data(), ws.inv_w.data(), ti, buf, k);
      const int64_t own = ws.labels[i];
      // Nearest other centroid (lowest index on ties); four independent min chains, since the
      // sequential compare-select chain was the hottest loop in perf (D = 200, k = 150).
      const double own_d = buf[own];
      buf[own] = kInf;
      double m0 = kInf, m1 = kInf, m2 = kInf, m3 = kInf;
      int64_t c = 0;
      for (; c + 4 <= k; c += 4) {
        m0 = std::min(m0, buf[c]);
        m1 = std::min(m1, buf[c + 1]);
        m2 = std::min(m2, buf[c + 2]);
        m3 = std::min(m3, buf[c + 3]);
      }
      for (; c < k; ++c) m0 = std::min(m0, buf[c]);
      const double m = std::min(std::min(m0, m1), std::min(m2, m3));
      double bd = own_d;
      int64_t bc = own;
      // Move only on a clear improvement: float noise must not make points oscillate between ties.
      if (m < own_d - p.tol) {
        bc = 0;
        while (buf[bc] != m) ++bc;
        bd = m;
      }
      ws.best_dist[i] = bd + p.gdiag[i];
      ws.next_label[i] = bc;
    }
    for (int64_t i = 0; i < d; ++i) {
      if (ws.next_label[i] != ws.labels[i]) {
        move_point(p, ws, i, ws.labels[i], ws.next_label[i]);
        ++changed;
      }
    }
    // Empty clusters take the point with the largest weighted distance from a cluster of >= 2 points
    // (it then costs 0, so the inertia still decreases).
    for (int64_t c = 0; c < k; ++c) {
      if (ws.cnt[c] > 0) continue;
      int64_t far = -1;
      double fd = -1.0;
      for (int64_t i = 0; i < d; ++i) {
        const double v = p.w[i] * ws.best_dist[i];
        if (ws.cnt[ws.labels[i]] > 1 && v > fd) {
          fd = v;
          far = i;
        }
      }
      move_point(p, ws, far, ws.labels[far], c);
      ws.best_dist[far] = -1.0;
      ++changed;
    }
    if (changed == 0) break;
  }
}

// Hartigan single-point moves until none lowers the inertia (at most max_iter sweeps).
void hartigan(const Problem& p, Workspace& ws, int64_t max_iter) {
  const int64_t d = p.d, k = p.k;
  for (int64_t sweep = 0; sweep < max_iter; ++sweep) {
    int64_t moved = 0;
    for (int64_t i = 0; i < d; ++i) {
      const int64_t a = ws.labels[i];
      if (ws.cnt[a] <= 1) continue;
      const double wi = p.w[i], gii = p.gdiag[i];
      const double* ti = ws.t.data() + i * k;
      const double da = gii - 2.0 * ti[a] * ws.inv_w[a] + ws.q[a];
      const double remove = wi * ws.wk[a] / (ws.wk[a] - wi) * da;
      double best = remove - wi * p.tol;
      int64_t b = -1;
      for (int64_t c = 0; c < k; ++c) {
        if (c == a || ws.cnt[c] == 0) continue;
        const double add = wi * ws.wk[c] / (ws.wk[c] + wi) * (gii - 2.0 * ti[c] * ws.inv_w[c] + ws.q[c]);
        if (add < best) {
          best = add;
          b = c;
        }
      }
      if (b < 0) continue;
      move_point(p, ws, i, a, b);
      ++moved;
    }
    if (moved == 0) break;
    cluster_stats(p, ws);  // drop the drift of the incremental updates before the next sweep
  }
}

// Number clusters by first appearance (in place) and return the weighted inertia
// J = sum_c (sum_{i in c} w_i G_ii - P_c / W_c), summed in the new cluster order. With exact = false the
// statistics are the incrementally updated ones (relative drift ~1e-15, still a deterministic function of
// the restart); with exact = true they are recomputed from the labels first (O(D^2)).
double canonical_inertia(const Problem& p, Workspace& ws, bool exact) {
  const int64_t d = p.d, k = p.k;
  std::vector<int64_t>& map = ws.centers;  // old cluster id -> new id
  std::vector<int64_t>& inverse = ws.next_label;  // new id -> old id (cluster_stats uses ws.fill)
  std::fill(map.begin(), map.end(), -1);
  int64_t next = 0;
  for (int64_t i = 0; i < d; ++i) {
    const int64_t old = ws.labels[i];
    if (map[old] < 0) {
      inverse[next] = old;
      map[old] = next++;
    }
  }
  if (exact) {
    for (int64_t i = 0; i < d; ++i) ws.labels[i] = map[ws.labels[i]];
    for (int64_t c = 0; c < next; ++c) inverse[c] = c;
    cluster_stats(p, ws);
  }
  std::vector<double>& within = ws.closest;  // reuse: per-cluster sum of w_i G_ii (old ids)
  std::fill(within.begin(), within.begin() + k, 0.0);
  for (int64_t i = 0; i < d; ++i) within[ws.labels[i]] += p.w[i] * p.gdiag[i];
  double total = 0.0;
  for (int64_t c = 0; c < next; ++c) {
    const int64_t old = inverse[c];
    total += std::max(within[old] - ws.pk[old] / ws.wk[old], 0.0);
  }
  if (!exact) {
    for (int64_t i = 0; i < d; ++i) ws.labels[i] = map[ws.labels[i]];
  }
  return total;
}

}  // namespace

std::vector<double> centered_gram_from_features(const double* x, int64_t d, int64_t f, const double* w,
                                                int num_threads) {
  double wsum = 0.0;
  for (int64_t i = 0; i < d; ++i) wsum += w[i];
  std::vector<double> mean(f, 0.0);
  for (int64_t i = 0; i < d; ++i) {
    const double s = w[i] / wsum;
    for (int64_t q = 0; q < f; ++q) mean[q] += s * x[i * f + q];
  }
  std::vector<double> xc(static_cast<size_t>(d * f));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t q = 0; q < f; ++q) xc[i * f + q] = x[i * f + q] - mean[q];
  std::vector<double> g(static_cast<size_t>(d * d));
  const int nt = resolve_threads(num_threads);
  (void)nt;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nt)
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = i; j < d; ++j) {
      const double v = dot(xc.data() + i * f, xc.data() + j * f, f);
      g[i * d + j] = v;
      g[j * d + i] = v;
    }
  }
  return g;
}

std::vector<double> centered_gram(const double* g, int64_t d, const double* w) {
  double wsum = 0.0;
  for (int64_t i = 0; i < d; ++i) wsum += w[i];
  std::vector<double> a(d, 0.0);  // a = G v, v = w / W
  double s = 0.0;                 // v^T G v
  for (int64_t i = 0; i < d; ++i) {
    double acc = 0.0;
    for (int64_t j = 0; j < d; ++j) acc += g[i * d + j] * w[j];
    a[i] = acc / wsum;
    s += w[i] / wsum * a[i];
  }
  std::vector<double> out(static_cast<size_t>(d * d));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = g[i * d + j] - a[i] - a[j] + s;
  return out;
}

KMeansResult weighted_kmeans_gram(const std::vector<double>& gram, int64_t d, const double* w,
                                  const KMeansOptions& opt) {
  PF_CHECK(d >= 1, "weighted_kmeans: need at least one point; got D = ", d);
  PF_CHECK(static_cast<int64_t>(gram.size()) == d * d, "weighted_kmeans: gram must be (D, D) = (", d, ", ", d,
           "); got ", gram.size(), " entries");
  PF_CHECK(opt.num_clusters >= 1 && opt.num_clusters <= d, "weighted_kmeans: num_clusters must be in [1, D = ", d,
           "]; got ", opt.num_clusters);
  PF_CHECK(opt.n_restarts >= 1, "weighted_kmeans: n_restarts must be >= 1; got ", opt.n_restarts);
  PF_CHECK(opt.top_k >= 1, "weighted_kmeans: top_k must be >= 1; got ", opt.top_k);
  PF_CHECK(opt.max_iter >= 0, "weighted_kmeans: max_iter must be >= 0; got ", opt.max_iter);
  for (int64_t i = 0; i < d; ++i) {
    PF_CHECK(std::isfinite(w[i]) && w[i] > 0.0, "weighted_kmeans: weights must be finite and > 0; weights[", i,
             "] = ", w[i]);
  }
  for (int64_t q = 0; q < d * d; ++q) {
    PF_CHECK(std::isfinite(gram[q]), "weighted_kmeans: gram / points contain NaN or inf (entry ", q, ")");
  }

  Problem p;
  p.d = d;
  p.k = opt.num_clusters;
  p.g = gram.data();
  p.w = w;
  p.gdiag.resize(d);
  double trace = 0.0;
  for (int64_t i = 0; i < d; ++i) {
    p.gdiag[i] = gram[i * d + i];
    trace += std::abs(p.gdiag[i]);
  }
  // Distances below ~1e-12 of the typical squared norm are float noise of the kernel formula
  // (cancellation in G_ii - 2 T_ic / W_c + P_c / W_c^2); comparisons ignore differences that small.
  p.tol = 1e-12 * trace / static_cast<double>(d);
  p.gw.resize(static_cast<size_t>(d * d));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) p.gw[i * d + j] = w[j] * gram[i * d + j];
  p.d2.resize(static_cast<size_t>(d * d));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j)
      p.d2[i * d + j] = i == j ? 0.0 : std::max(p.gdiag[i] + p.gdiag[j] - 2.0 * gram[i * d + j], 0.0);
  const bool ward = opt.init == Init::Ward;
  if (ward) {
    // The initial row minima are the same for every restart: compute them once.
    Workspace tmp(p);
    std::copy(p.d2.begin(), p.d2.end(), tmp.d2.begin());
    for (int64_t a = 0; a < d; ++a) {
      tmp.wc[a] = w[a];
      tmp.active[a] = 1;
    }
    for (int64_t a = 0; a < d; ++a) ward_row(p, tmp, a);
    p.row_min0 = tmp.row_min;
    p.row_arg0 = tmp.row_arg;
  }

  KMeansResult res;
  res.restart_inertia.assign(opt.n_restarts, kInf);
  res.inertia = kInf;
  res.best_restart = -1;
  // Default thread count: below ~2e6 units of D^2 work (about 1 ms) waking a thread team costs more than
  // it saves (D = 40, 20 restarts: 30 ms on 2 threads against 0.5 ms on one, 2-core VM under load).
  // An explicit num_threads is honoured.
  const bool small = d * d * opt.n_restarts < 2000000;
  const int nt = opt.num_threads <= 0 && small
                     ? 1
                     : static_cast<int>(std::min<int64_t>(resolve_threads(opt.num_threads), opt.n_restarts));
  (void)nt;
#pragma omp parallel num_threads(nt)
  {
    Workspace ws(p);
    std::vector<int64_t> best_labels(d);
    double best_inertia = kInf;
    int64_t best_r = -1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < opt.n_restarts; ++r) {
      Rng rng(opt.seed, static_cast<uint64_t>(r));
      if (ward) {
        randomized_ward(p, ws, rng, opt.top_k);
      } else {
        kmeans_pp(p, ws, rng);
      }
      lloyd(p, ws, opt.max_iter);
      if (opt.refine == Refine::Hartigan) hartigan(p, ws, opt.max_iter);
      const double inertia = canonical_inertia(p, ws, /*exact=*/false);
      res.restart_inertia[r] = inertia;
      if (inertia < best_inertia || (inertia == best_inertia && r < best_r)) {
        best_inertia = inertia;
        best_r = r;
        std::copy(ws.labels.begin(), ws.labels.end(), best_labels.begin());
      }
    }
#pragma omp critical(pyfusion_cluster_best)
    {
      if (best_r >= 0 && (best_inertia < res.inertia || (best_inertia == res.inertia && best_r < res.best_restart) ||
                          res.best_restart < 0)) {
        res.inertia = best_inertia;
        res.best_restart = best_r;
        res.labels = best_labels;
      }
    }
  }
  // Exact inertia of the winner (the per-restart values carry the drift of the incremental updates).
  Workspace ws(p);
  std::copy(res.labels.begin(), res.labels.end(), ws.labels.begin());
  res.inertia = canonical_inertia(p, ws, /*exact=*/true);
  return res;
}

}  // namespace pyfusion::cluster
