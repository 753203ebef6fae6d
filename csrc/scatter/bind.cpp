// pybind11 binding of the dense scatter engine. Buffers travel as integer addresses (data_ptr) plus sizes, so the
// module stays torch-free; pyfusion.fuse.builder owns and validates them (float64 / int64, contiguous, CPU).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"
#include "scatter/scatter.h"

namespace py = pybind11;

namespace {

using MemberTuple =
    std::tuple<uintptr_t, int64_t, int64_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int, double, bool>;
using BlockTuple = std::tuple<int64_t, int64_t, uintptr_t, int64_t, uintptr_t>;

}  // namespace

void bind_scatter(py::module_& m) {
  m.def(
      "scatter_blocks_f64",
      [](const std::vector<MemberTuple>& members, int64_t N0, int64_t N1, int64_t taps,
         const std::vector<BlockTuple>& blocks, bool packed_zeros, int threads) {
        std::vector<pyfusion::scatter::Member> ms;
        ms.reserve(members.size());
        for (const auto& t : members) {
          ms.push_back({reinterpret_cast<const double*>(std::get<0>(t)), std::get<1>(t), std::get<2>(t),
                        reinterpret_cast<const int64_t*>(std::get<3>(t)),
                        reinterpret_cast<const int64_t*>(std::get<4>(t)),
                        reinterpret_cast<const double*>(std::get<5>(t)),
                        reinterpret_cast<const double*>(std::get<6>(t)), std::get<7>(t), std::get<8>(t),
                        std::get<9>(t)});
        }
        std::vector<pyfusion::scatter::Block> bs;
        bs.reserve(blocks.size());
        for (const auto& b : blocks) {
          bs.push_back({std::get<0>(b), std::get<1>(b), reinterpret_cast<const int64_t*>(std::get<2>(b)),
                        std::get<3>(b), reinterpret_cast<double*>(std::get<4>(b))});
        }
        py::gil_scoped_release release;
        pyfusion::scatter::scatter_blocks_f64(ms, N0, N1, taps, bs, packed_zeros, threads);
      },
      py::arg("members"), py::arg("rows"), py::arg("cols"), py::arg("taps"), py::arg("blocks"),
      py::arg("packed_zeros"), py::arg("threads") = 1,
      "Blocks (row0, n_rows, cols, n_cols, out) of the fused (rows, cols, taps) tensor from members (src, n0, n1, "
      "dest0, dest1, v0, v1, v_first, lam, scale_lam) given as integer addresses (0: no factor); bit-equal to the "
      "builder's torch scatter (packed_zeros false: _scatter_dense_direct, true: _scatter_packed).");
}
