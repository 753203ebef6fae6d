// Dense zero-block scatter of the builder (pyfusion.fuse.builder._scatter_dense_direct) in one pass.
#pragma once

#include <cstdint>
#include <vector>

namespace pyfusion::scatter {

// One member's tensor and where it goes: src (n0, n1, taps) float64 contiguous; dest0 (n0) / dest1 (n1) the fused
// row / column of each of its rows / columns (injective, < N0 / N1); v0 (n0) / v1 (n1) optional per-row / column
// factors (nullptr: none), applied in the order v_first (0: v0 then v1, 1: v1 then v0); lam applied last when
// scale_lam.
struct Member {
  const double* src;
  int64_t n0, n1;
  const int64_t* dest0;
  const int64_t* dest1;
  const double* v0;
  const double* v1;
  int v_first;
  double lam;
  bool scale_lam;
};

// out (N0, N1, taps): entry = sum over the members reaching it, in member order, of their scaled values, with
// exactly the torch path's operations: out = 0 everywhere, member 0 written (index_copy_), later members added
// (out + x, index_add_); x = ((src * v_a) * v_b) * lam as _scatter_source computes it.
void scatter_dense_f64(const std::vector<Member>& members, int64_t N0, int64_t N1, int64_t taps, double* out,
                       int threads);

}  // namespace pyfusion::scatter
