// Small-batch CPU kernel of a partially fused linear layer (pyfusion.ops.partial_linear, DESIGN §7):
// y = act(x W^T + b) for a few input rows, every block in one call, from raw pointers (torch-free).
//
// Layouts in_layout = [I_s, I_1, ..., I_K], out_layout = [O_s, O_1, ..., O_K]. Packed weight:
//   w_shared (O_s, I_total) row-major: shared output rows on every input column;
//   w_cross  (O_B, I_s)     row-major: every branch output row on the shared input columns;
//   w_diag   flat, block k = (O_k, I_k) row-major, blocks concatenated in branch order.
// A branch-k output row is dot(w_cross row, x[:, :I_s]) + dot(W_kk row, x[:, i0_k : i0_k + I_k]).
//
// panel_linear.h is the successor for every batch size: segments with member masks (no stored zero block for K >= 3
// subset slots) and a pre-packed weight; this kernel stays for the 3-buffer format until the ops adopt that one.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pyfusion::partial_linear {

// OpenMP over output rows only from this many multiply-adds per call (rows * stored weights). Measured with
// bench/bench_partial_linear_batch1.py --threshold (1 row, layout [n,n,n]->[n,n,n], 2-core AMD EPYC VM),
// median us 1 thread / 2 threads: at load ~5 (other jobs): 29k MACs 1.6/4.1, 115k 4.3/4.7, 459k 19.1/11.7,
// 1.0M 43/26, 7.3M 786/462, so the break-even lies between 115k and 459k and 2 threads give ~1.7x above it;
// 2^19 = 524k leaves a margin. In two other runs, while other jobs kept the second core busy (load 2-11),
// every parallel region took ~8 ms or ~20 ms at every size (the woken worker waits for a time slice), so on a
// shared machine run with torch.set_num_threads(1) or raise the threshold
// (PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS, or per plan through Plan::parallel_min_macs).
constexpr int64_t kParallelMinMacs = int64_t(1) << 19;

enum class Activation : int { None = 0, Relu = 1, Gelu = 2, Silu = 3 };

// One layout and activation, validated once (the Python side caches a Plan per layout): totals and work size.
struct Plan {
  std::vector<int64_t> in_layout, out_layout;
  Activation act = Activation::None;
  int64_t i_total = 0, o_total = 0;
  int64_t macs_per_row = 0;  // stored weights = multiply-adds per input row
  int64_t parallel_min_macs = kParallelMinMacs;  // per plan: benchmarks and an env override move it
  Plan(const std::vector<int64_t>& in_layout, const std::vector<int64_t>& out_layout, int activation);
};

// x: rows x I_total with row stride x_row_stride (unit column stride); y: rows x O_total contiguous;
// bias may be null. num_threads <= 0: OpenMP's current default (torch.set_num_threads sets it: the extension
// and torch share libgomp). OpenMP is used only when rows * macs_per_row reaches plan.parallel_min_macs.
template <typename T>
void forward(const Plan& plan, const T* x, int64_t rows, int64_t x_row_stride, const T* w_shared, const T* w_cross,
             const T* w_diag, const T* bias, T* y, int num_threads);

// The SIMD variant in use ("avx512", "avx2" or "default"), and forcing one the CPU supports ("auto": the best).
std::string isa();
void set_isa(const std::string& name);

}  // namespace pyfusion::partial_linear
