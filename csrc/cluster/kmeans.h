// Weighted k-means with randomized-Ward (or k-means++) starts, in kernel form. Torch-free.
//
// Problem: D points with weights w_i > 0, given either as features X (D, F) or only through their
// Gram matrix G = X X^T (D, D). Find labels c(i) in [0, k) minimising the weighted inertia
//     J = sum_i w_i || x_i - mu_{c(i)} ||^2,   mu_c = sum_{i in c} w_i x_i / W_c,   W_c = sum_{i in c} w_i.
// Everything is computed from G (after weighted centring, which leaves J unchanged and reduces
// cancellation): ||x_i - mu_c||^2 = G_ii - 2 T_ic / W_c + P_c / W_c^2 with T_ic = sum_{j in c} w_j G_ij
// and P_c = sum_{i in c} w_i T_ic. Activations over many samples are never needed, only their Gram.
//
// One restart (generalized pruning, Morelli & Eckstein 2026, `StochHierarchical`):
//   1. randomized Ward: agglomerative merges with cost sqrt(2 w_a w_b / (w_a + w_b) ||mu_a - mu_b||^2)
//      (scipy's Ward distance); at each merge the top_k cheapest row-minimum pairs are candidates,
//      chosen with probability proportional to exp(-(c - c_min) / mean(c - c_min)); centroid distances
//      follow the exact Lance-Williams update for centroids. top_k = 1 is plain greedy Ward.
//      Or weighted greedy k-means++ (Arthur & Vassilvitskii 2007; 2 + ln k local trials as scikit-learn).
//   2. Lloyd iterations to a fixed point (empty clusters take the point farthest from its centroid).
//   3. optionally Hartigan single-point moves (Hartigan & Wong 1979): move i from a to b when
//      w_i W_b / (W_b + w_i) d(i, b) < w_i W_a / (W_a - w_i) d(i, a); each move strictly lowers J,
//      and a Lloyd fixed point usually still has such moves.
// The best J over n_restarts wins (ties: the lowest restart index); restarts are compared on J from the
// incrementally updated statistics (relative drift ~1e-15), and the winner's J is then recomputed exactly.
// Restart r seeds its own RNG from (seed, r) and runs on one thread, so the result does not depend on
// the number of threads. Cost per restart: O(D^2) for the start and O(D k) per Lloyd / Hartigan sweep.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pyfusion::cluster {

enum class Init { Ward, KMeansPP };
enum class Refine { Lloyd, Hartigan };

struct KMeansOptions {
  int64_t num_clusters = 1;
  int64_t n_restarts = 1;
  Init init = Init::Ward;
  int64_t top_k = 5;
  int64_t max_iter = 100;
  Refine refine = Refine::Hartigan;
  uint64_t seed = 0;
  int num_threads = 0;  // <= 0: OpenMP default
};

struct KMeansResult {
  std::vector<int64_t> labels;          // (D,), clusters numbered by first appearance
  double inertia = 0.0;                 // weighted inertia of `labels` (kernel form, recomputed exactly)
  int64_t best_restart = 0;
  std::vector<double> restart_inertia;  // (n_restarts,) each restart's J (incremental statistics)
};

// Gram matrix of X (D, F) after weighted centring: G = (X - 1 m^T)(X - 1 m^T)^T, m = sum w_i x_i / W.
std::vector<double> centered_gram_from_features(const double* x, int64_t d, int64_t f, const double* w,
                                                int num_threads);

// Weighted centring of a symmetric Gram matrix (D, D): G <- (I - 1 v^T) G (I - v 1^T), v = w / W.
std::vector<double> centered_gram(const double* g, int64_t d, const double* w);

// Run the restarts on a centred Gram matrix (D, D) with weights (D,). Validates its inputs.
KMeansResult weighted_kmeans_gram(const std::vector<double>& gram, int64_t d, const double* w,
                                  const KMeansOptions& opt);

}  // namespace pyfusion::cluster
