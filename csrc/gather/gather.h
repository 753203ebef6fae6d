// Gather along the middle axis of a (outer, n_axis, inner) float64 array, with each outer row's sum of squares
// taken from the copy while it is in L1: the feature rows of partial fusion's weight costs (an incoming-weight
// tensor with its input axis mapped through a matched-pairs alignment) and the squared norms that
// pyfusion.match.distance.sqdist needs of them, in one pass over the source instead of a gather and a second
// pass for the norms. Torch-free.
#pragma once

#include <cstdint>

namespace pyfusion::gather {

// out (outer, n_index, inner) = src (outer, n_axis, inner; contiguous)[:, index, :]; index entries in [0, n_axis)
// (checked). sq (outer), when not null, gets sum_e out[o, e]^2 over the row's n_index * inner entries: entry e
// goes to lane e mod kLanes (a square, then an add: no FMA), the lanes are then added pairwise in a fixed tree.
// The order depends on neither the CPU (AVX-512 or baseline code: the same bits) nor the thread count; two equal
// rows get equal bits. Outer rows run on up to `threads` OpenMP threads (<= 0: the runtime default).
void gather_axis1_f64(const double* src, int64_t outer, int64_t n_axis, int64_t inner, const int64_t* index,
                      int64_t n_index, double* out, double* sq, int threads);

// Lanes of the sum of squares (4 zmm registers of 8 doubles)
constexpr int64_t kLanes = 32;

}  // namespace pyfusion::gather
