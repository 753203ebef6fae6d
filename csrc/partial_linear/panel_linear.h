// Panel-packed CPU engine of a partially fused linear layer, for every batch size and for layouts whose shared
// slots may come from a subset of the members (K >= 3), with no stored exact-zero block.
//
// ---- Layout: segments with member masks ----------------------------------------------------------------------
// The input columns and the output rows are each cut into segments; segment s has a size and a member mask (bit k =
// member k contributes to these slots). The layout [shared | branch_1 | ... | branch_K] of DESIGN §7 is the case
//   in  = [(I_s, all K bits), (I_1, bit 0), ..., (I_K, bit K-1)],   out likewise,
// and K >= 3 fusions whose shared slots are built from member subsets split the shared segment by subset, e.g.
// K = 3: shared {1,2,3} | shared {1,2} | shared {1,3} | shared {2,3} | branch_1 | branch_2 | branch_3.
// The weight of output segment o on input segment i can be non-zero only if their masks intersect (W' = sum_k
// A_k W_k B_k: output slot s reads input slot t only through a member k in mask(s) & mask(t)). So block (o, i) is
// stored iff (mask_o & mask_i) != 0, and a layout sorted by subset has no structural zero stored or multiplied:
// today's 3-buffer format stores the blocks (shared {1,2} out) x (branch_3 in) and (branch_3 out) x (shared {1,2}
// in), 5-15% of the weights for K >= 3. Slots inside the shared segment may be put in any order by the builder as
// long as the next layer's input columns follow the same order, so sorting shared slots by subset is free.
//
// ---- Storage format ("segment rows"; what a module would keep as its parameter) ------------------------------
// For each output segment o in order, W_o of shape (O_o, K_o), row-major, K_o = sum of the sizes of the allowed
// input segments (mask intersecting), whose columns are those segments' columns concatenated in increasing segment
// order. The W_o are concatenated into one flat buffer: W_o starts at segment_offset(o) = sum_{o' < o} O_o' K_o'.
// For the standard layout this is w_shared (O_s, I_total) followed, per branch k, by [w_cross rows of k | W_kk].
//
// ---- Execution format ("panels"; derived once per weight version, read by forward) ----------------------------
// PW = 64 bytes / sizeof(T) (16 float32, 8 float64). For each output segment o, ceil(O_o / PW) panels; panel p of o
// is K_o x PW, k-major: element (k, j) = W_o[p * PW + j, k] (0 for p * PW + j >= O_o). Panels of a segment are
// consecutive; segments follow in order; panel_offset(o) = sum_{o' < o} ceil(O_o' / PW) * PW * K_o'. A micro-tile
// broadcasts one input value and multiplies it into whole panel rows (vector loads, no horizontal sums), so the
// same format serves batch 1 (the weights stream once) and large batches (GEMM tiles of up to 8 rows x 3 panels).
//
// y (rows, O_total) = act(x W^T + b) over all output segments in one call (bias and activation fused), OpenMP over
// (output tile, row group) units from plan.parallel_min_macs multiply-adds per call.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pyfusion::panel_linear {

enum class Activation : int { None = 0, Relu = 1, Gelu = 2, Silu = 3 };

// One column range of x read by an output segment (adjacent allowed input segments are merged).
struct Range {
  int64_t start = 0, len = 0;
};

struct Plan {
  std::vector<int64_t> in_sizes, out_sizes;
  std::vector<uint64_t> in_masks, out_masks;
  Activation act = Activation::None;
  int64_t i_total = 0, o_total = 0;
  std::vector<int64_t> in_start, out_start;  // first column / row of each segment
  std::vector<int64_t> k_of_out;             // K_o: allowed input columns of output segment o
  std::vector<std::vector<Range>> ranges;    // allowed input column ranges of output segment o, increasing
  std::vector<int64_t> segment_offset;       // storage format: start of W_o (size o_count + 1: the total last)
  int64_t macs_per_row = 0;                  // stored weights = multiply-adds per input row
  int64_t parallel_min_macs = int64_t(1) << 19;

  Plan(const std::vector<int64_t>& in_sizes, const std::vector<uint64_t>& in_masks,
       const std::vector<int64_t>& out_sizes, const std::vector<uint64_t>& out_masks, int activation);

  // Elements of the execution format for element size `elem_bytes` (4 or 8), and the start of segment o in it.
  int64_t packed_size(int elem_bytes) const { return panel_offset(static_cast<int64_t>(out_sizes.size()), elem_bytes); }
  int64_t panel_offset(int64_t o, int elem_bytes) const;
  // Whether block (output segment o, input segment i) is stored.
  bool allowed(int64_t o, int64_t i) const { return (out_masks[o] & in_masks[i]) != 0; }
};

// Storage format (flat, segment_offset) -> execution format (packed_size). T = float or double.
template <typename T>
void pack_segments(const Plan& plan, const T* src, T* dst);

// The 3-buffer format of pyfusion.ops.partial_linear (w_shared (O_s, I_total), w_cross (O_B, I_s), w_diag) -> the
// execution format. Only for the standard layout: 1 + K segments on both sides, masks [all, bit 0, ..., bit K-1].
template <typename T>
void pack_blocks(const Plan& plan, const T* w_shared, const T* w_cross, const T* w_diag, T* dst);

// Execution format -> dense (O_total, I_total) row-major, zeros in the blocks that are not stored (tests).
template <typename T>
void unpack_dense(const Plan& plan, const T* packed, T* dense);

// x: rows x I_total, row stride sx (unit column stride); y: rows x O_total, row stride sy; bias may be null.
// num_threads <= 0: OpenMP's default; threads are used only from plan.parallel_min_macs multiply-adds.
template <typename T>
void forward(const Plan& plan, const T* x, int64_t rows, int64_t sx, const T* packed, const T* bias, T* y, int64_t sy,
             int num_threads);

// The SIMD variant in use ("avx512", "avx2" or "default") and forcing one the CPU supports ("auto": the best).
std::string isa();
void set_isa(const std::string& name);

}  // namespace pyfusion::panel_linear
