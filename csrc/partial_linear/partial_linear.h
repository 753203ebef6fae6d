// Small-batch CPU kernel of a partially fused linear layer (pyfusion.ops.partial_linear, DESIGN §7):
// y = act(x W^T + b) for a few input rows, every block in one call, from raw pointers (torch-free).
//
// Layouts in_layout = [I_s, I_1, ..., I_K], out_layout = [O_s, O_1, ..., O_K]. Packed weight:
//   w_shared (O_s, I_total) row-major: shared output rows on every input column;
//   w_cross  (O_B, I_s)     row-major: every branch output row on the shared input columns;
//   w_diag   flat, block k = (O_k, I_k) row-major, blocks concatenated in branch order.
// A branch-k output row is dot(w_cross row, x[:, :I_s]) + dot(W_kk row, x[:, i0_k : i0_k + I_k]).
#pragma once

#include <cstdint>
#include <vector>

namespace pyfusion::partial_linear {

// OpenMP over output rows only from this many multiply-adds per call (rows * stored weights). Measured with
// bench/bench_partial_linear_batch1.py --threshold (1 row, layout [n,n,n]->[n,n,n], 2-core AMD EPYC VM shared
// with other jobs, load 7-11): 1 thread 1.9 us (29k MACs) ... 672 us (7.3M MACs), 2 threads ~20 ms at every
// size: the woken worker waits for a time slice of the busy cores, so on this VM threads never paid. On an idle
// machine a libgomp fork/join costs a few us, which could not be measured here. 16M keeps every batch-1 shape
// of the benchmark (at most 9.4M: BERT FFN K=4 alpha=1) on one thread and parallelises only multi-row calls of
// ~1.5 ms or more single-threaded; lower it per plan (Plan::parallel_min_macs) on a dedicated machine.
constexpr int64_t kParallelMinMacs = int64_t(1) << 24;

enum class Activation : int { None = 0, Relu = 1, Gelu = 2, Silu = 3 };

// One layout, precomputed once: per output segment the weight offsets and the input columns it reads.
struct Plan {
  std::vector<int64_t> in_layout, out_layout;
  Activation act = Activation::None;
  int64_t i_total = 0, o_total = 0;
  int64_t macs_per_row = 0;  // stored weights = multiply-adds per input row
  int64_t parallel_min_macs = kParallelMinMacs;  // per plan, so that a benchmark can move the threshold
  Plan(const std::vector<int64_t>& in_layout, const std::vector<int64_t>& out_layout, int activation);
};

// x: rows x I_total with row stride x_row_stride (unit column stride); y: rows x O_total contiguous;
// bias may be null. num_threads <= 0: OpenMP's current default (torch.set_num_threads sets it: the extension
// and torch share libgomp). OpenMP is used only when rows * macs_per_row reaches plan.parallel_min_macs.
template <typename T>
void forward(const Plan& plan, const T* x, int64_t rows, int64_t x_row_stride, const T* w_shared, const T* w_cross,
             const T* w_diag, const T* bias, T* y, int num_threads);

}  // namespace pyfusion::partial_linear
