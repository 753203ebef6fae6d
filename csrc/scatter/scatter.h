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

// One block of the fused tensor: rows [row0, row0 + n_rows) at the fused columns cols[0..n_cols), written to out
// (n_rows, n_cols, taps) contiguous.
struct Block {
  int64_t row0, n_rows;
  const int64_t* cols;
  int64_t n_cols;
  double* out;
};

// Every block's entries = the members' scaled values ((src * v_a) * v_b) * lam (as _scatter_source computes them),
// summed in member order with exactly the torch paths' operations:
// - packed_zeros false (builder._scatter_dense_direct): 0 everywhere, member 0 written (index_copy_), each later
//   member added where it reaches (index_add_: out + x);
// - packed_zeros true (builder._scatter_packed): only the members reaching at least one entry of the block take
//   part; the first writes its value or +0 (its zero pad), each later one adds its value or +0.
void scatter_blocks_f64(const std::vector<Member>& members, int64_t N0, int64_t N1, int64_t taps,
                        const std::vector<Block>& blocks, bool packed_zeros, int threads);

}  // namespace pyfusion::scatter
