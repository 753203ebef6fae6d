// Exact dense linear assignment (LSAP) in torch-free C++.
//
// Problem: given a cost matrix C (n x m, row-major), find a matching x of every row of the smaller side
// that minimises sum_i C[i, x_i] (or maximises it). Forbidden pairs are +inf (minimise) / -inf
// (maximise). Algorithm: Jonker & Volgenant (1987), "A shortest augmenting path algorithm for dense and
// sparse linear assignment problems": column reduction, reduction transfer and augmenting row
// reduction build a partial assignment with dual potentials v, then Dijkstra shortest augmenting paths
// on the reduced costs C[i, j] - v[j] complete it. Rectangular problems (n < m) skip the JV
// initialisation (it assumes a square matrix) and run the augmenting paths from v = 0, which keeps the
// rectangular optimality conditions (v <= 0, v = 0 on unmatched columns); n > m is solved transposed.
//
// Partial forms (DESIGN §4) are solved directly on the n x m cost by successive shortest augmenting paths
// from all free rows at once (lsap.cpp, KCardCore; Dell'Amico & Martello 1997): num_matches = k runs exactly k
// augmentations (k = min(n, m) is the complete problem above), unmatched_cost = u augments while the next path
// costs less than 2u. With PartialEngine::kAuto a num_matches problem with k > 0.9 min(n, m) is solved instead as
// the square sink-augmented problem (the previous engine; kPadded / kDirect force one, for tests and benchmarks):
//   num_matches = k: append n - k zero-cost dummy columns and m - k dummy rows, dummy-dummy forbidden;
//   unmatched_cost = u: row i may go to its own dummy column at cost u, column j to its own dummy row.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pyfusion {
namespace lsap {

enum class PartialEngine { kAuto, kDirect, kPadded };

// One problem of a batch. `cost` points at n*m values of type T (row-major, contiguous).
struct Problem {
  const void* cost = nullptr;
  int64_t n = 0;
  int64_t m = 0;
  int64_t num_matches = -1;  // < 0: a complete (row- or column-complete) assignment
};

struct Options {
  bool maximize = false;
  bool has_unmatched_cost = false;
  double unmatched_cost = 0.0;  // cost per unmatched row / column (in the caller's sense: a gain if maximize)
  int num_threads = 0;          // <= 0: OpenMP default
  PartialEngine partial_engine = PartialEngine::kAuto;  // how the partial forms are solved (see above)
};

// Solves every problem. col_for_row: B x stride int64, filled with the matched column of each row or -1;
// totals: B doubles, the sum of the matched entries of the original cost (unmatched costs excluded).
// Throws std::invalid_argument (the message names the problem, value and position) on NaN, on an
// infinity of the wrong sign, and on infeasible problems. T is float or double.
template <typename T>
void solve_batch(const std::vector<Problem>& problems, const Options& opt, int64_t* col_for_row, int64_t stride,
                 double* totals);

// Which SIMD path the kernels use on this CPU ("avx512 (f, dq, vl, bw)", "avx2" or "default").
std::string simd_path();

// Test hook: use at most this SIMD level ("avx512", "avx2", "default"; "auto" = the CPU's best). Returns
// the previous path. Not for production use: it changes a process-wide setting.
std::string set_simd_level(const std::string& name);

}  // namespace lsap
}  // namespace pyfusion
