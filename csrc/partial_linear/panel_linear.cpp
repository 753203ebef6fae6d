// Panel-packed CPU engine of a partially fused linear layer (see panel_linear.h for the formats).
//
// Micro-tile: MR input rows x P panels (P * PW outputs). Per allowed input column k: P * NV vector loads of the
// panel rows, MR broadcasts of x[m, k] from the k-major packed x, MR * P * NV FMAs into register accumulators; the
// K-loop walks only the segment's allowed column ranges. Epilogue: bias, activation, masked store.
// Tile shapes per variant (accumulators + panel vectors + 1 broadcast <= registers): AVX-512 8 x 3 panels (24 zmm
// accumulators, 3 loads + 8 broadcasts per 24 FMAs), AVX2 6 x 1 panel (12 ymm), baseline 2 x 1 panel (8 xmm).
#include "partial_linear/panel_linear.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "common.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace pyfusion::panel_linear {

namespace {

#define PF_INLINE inline __attribute__((always_inline))

template <typename T>
constexpr int panel_width() {
  return 64 / static_cast<int>(sizeof(T));
}

// B-byte vectors of T; aligned(sizeof(T)) makes a dereference an unaligned load.
template <typename T, int B>
struct Vec {
  typedef T type __attribute__((vector_size(B), aligned(sizeof(T))));
};

template <typename T>
PF_INLINE T activate(T z, Activation act) {
  switch (act) {
    case Activation::Relu:
      return z > T(0) ? z : T(0);
    case Activation::Gelu:  // exact (erf) form, torch's default
      return T(0.5) * z * (T(1) + std::erf(z * T(0.70710678118654752440)));
    case Activation::Silu:
      return z / (T(1) + std::exp(-z));
    default:
      return z;
  }
}

// Everything one micro-tile needs.
template <typename T>
struct TileArgs {
  const Range* ranges;
  int nranges;
  const T* xp;     // packed x of this row micro-panel: element (m, col) at xp[col * il + m]
  int64_t il;      // interleave of the packed x (rows per column group)
  const T* wp;     // first panel of the tile
  int64_t kpan;    // elements from one panel to the next (K_o * PW)
  const T* bias;   // bias of the tile's first output, or null
  T* y;            // y of the tile's first row and output
  int64_t sy;      // row stride of y
  int rows;        // valid rows (<= MR)
  int cols;        // valid outputs (<= P * PW)
  Activation act;
};

template <typename T, int B, int MR, int P>
PF_INLINE void tile_impl(const TileArgs<T>& a) {
  using vt = typename Vec<T, B>::type;
  constexpr int PW = panel_width<T>();
  constexpr int VW = B / static_cast<int>(sizeof(T));
  constexpr int NV = PW / VW;
  vt acc[MR][P * NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 12
    for (int v = 0; v < P * NV; ++v) acc[m][v] = vt{};
  const T* w = a.wp;
  const int64_t il = a.il, kpan = a.kpan;
  for (int r = 0; r < a.nranges; ++r) {
    const T* xk = a.xp + a.ranges[r].start * il;
    const int64_t len = a.ranges[r].len;
    for (int64_t k = 0; k < len; ++k) {
      vt wv[P * NV];
#pragma GCC unroll 12
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) wv[p * NV + v] = *reinterpret_cast<const vt*>(w + p * kpan + k * PW + v * VW);
      const T* xr = xk + k * il;
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        // Scalar * vector: GCC emits one vbroadcastss from memory per row (`vt{} + x` kept an addition of +0.0,
        // not an identity for -0.0, and a register broadcast: two extra FMA-port uops per row, 90 -> 138 GFLOP/s at
        // 256 rows of a 768-wide layer).
        const T xm = xr[m];
#pragma GCC unroll 12
        for (int v = 0; v < P * NV; ++v) acc[m][v] += xm * wv[v];
      }
    }
    w += len * PW;
  }
  // Epilogue: accumulators -> stack tile -> bias, activation, masked store.
  alignas(64) T out[MR][P * PW];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 12
    for (int v = 0; v < P * NV; ++v) std::memcpy(&out[m][v * VW], &acc[m][v], sizeof(vt));
  for (int m = 0; m < a.rows; ++m) {
    T* yr = a.y + m * a.sy;
    for (int j = 0; j < a.cols; ++j) {
      const T z = out[m][j] + (a.bias ? a.bias[j] : T(0));
      yr[j] = activate(z, a.act);
    }
  }
}

template <typename T>
using TileFn = void (*)(const TileArgs<T>&);

// Tiles compiled per variant (a template cannot inherit the target of its caller, and a tile reached through a
// function pointer is not inlined): tile_<variant><T, MR, P>.
template <typename T, int MR, int P>
__attribute__((target("avx512f,fma"))) void tile_avx512(const TileArgs<T>& a) {
  tile_impl<T, 64, MR, P>(a);
}
template <typename T, int MR, int P>
__attribute__((target("avx2,fma"))) void tile_avx2(const TileArgs<T>& a) {
  tile_impl<T, 32, MR, P>(a);
}
template <typename T, int MR, int P>
void tile_default(const TileArgs<T>& a) {
  tile_impl<T, 16, MR, P>(a);
}
struct Avx512Tiles {
  template <typename T, int MR, int P>
  static TileFn<T> get() {
    return &tile_avx512<T, MR, P>;
  }
};
struct Avx2Tiles {
  template <typename T, int MR, int P>
  static TileFn<T> get() {
    return &tile_avx2<T, MR, P>;
  }
};
struct DefaultTiles {
  template <typename T, int MR, int P>
  static TileFn<T> get() {
    return &tile_default<T, MR, P>;
  }
};

// The dispatch table of one variant: fn[MR - 1][P - 1] = tile<MR, P> for MR in 1..MRMAX, P in 1..PMAX.
template <typename T, int MRMAX, int PMAX>
struct Table {
  TileFn<T> fn[MRMAX][PMAX];
};

template <typename T, typename Tiles, int MRMAX, int PMAX, int MR = 1, int P = 1>
void fill_table(Table<T, MRMAX, PMAX>& t) {
  t.fn[MR - 1][P - 1] = Tiles::template get<T, MR, P>();
  if constexpr (P < PMAX) {
    fill_table<T, Tiles, MRMAX, PMAX, MR, P + 1>(t);
  } else if constexpr (MR < MRMAX) {
    fill_table<T, Tiles, MRMAX, PMAX, MR + 1, 1>(t);
  }
}

template <typename T, typename Tiles, int MRMAX, int PMAX>
const Table<T, MRMAX, PMAX>& table() {
  static const Table<T, MRMAX, PMAX> t = [] {
    Table<T, MRMAX, PMAX> r{};
    fill_table<T, Tiles, MRMAX, PMAX>(r);
    return r;
  }();
  return t;
}

struct Unit {
  int32_t seg;     // output segment
  int32_t panel;   // first panel of the tile
  int32_t npanel;  // panels in the tile
};

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

// The driver of one variant. MRMAX rows per micro-panel, PMAX panels per tile.
template <typename T, int MRMAX, int PMAX>
PF_INLINE void forward_impl(const Plan& plan, const T* x, int64_t rows, int64_t sx, const T* packed, const T* bias,
                            T* y, int64_t sy, int threads, const Table<T, MRMAX, PMAX>& table) {
  constexpr int PW = panel_width<T>();
  // Packed x: micro-panels of MRMAX rows (a batch of <= MRMAX rows is one dense micro-panel), column-major inside:
  // element (m, col) of micro-panel mp at xp[(mp * I + col) * il + m]. One row needs no packing at all.
  const int64_t il = rows <= MRMAX ? rows : MRMAX;
  const int64_t nmp = (rows + il - 1) / il;
  const int64_t I = plan.i_total;
  // The packed copy is kept per calling thread between calls up to kKeepBytes (batch-size calls at inference
  // reuse it); a larger one is allocated for the call and freed after it.
  constexpr int64_t kKeepBytes = int64_t(16) << 20;
  thread_local std::unique_ptr<T, AlignedFree> xbuf;
  thread_local int64_t xcap = 0;
  std::unique_ptr<T, AlignedFree> big;
  const T* xp = x;
  if (rows > 1 && I > 0) {
    const int64_t need = nmp * I * il;
    const size_t bytes = (static_cast<size_t>(need) * sizeof(T) + 63) / 64 * 64;
    T* dst = nullptr;
    if (static_cast<int64_t>(bytes) > kKeepBytes) {
      big.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      dst = big.get();
    } else {
      if (xcap < need) {
        xbuf.reset();
        xcap = 0;
        xbuf.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
        if (xbuf) xcap = need;
      }
      dst = xbuf.get();
    }
    PF_CHECK(dst != nullptr, "partial_linear (panels): could not allocate ", bytes, " bytes for the packed input");
    for (int64_t mp = 0; mp < nmp; ++mp) {
      const int64_t m0 = mp * il, mn = std::min<int64_t>(il, rows - m0);
      T* d = dst + mp * I * il;
      for (int64_t m = 0; m < mn; ++m) {
        const T* xr = x + (m0 + m) * sx;
        for (int64_t c = 0; c < I; ++c) d[c * il + m] = xr[c];
      }
    }
    xp = dst;
  }
  // Tiles: up to PMAX panels of one output segment each, balanced (16 panels -> 3 3 3 3 2 2, not 3 3 3 3 3 1: a
  // one-panel tile does 8 FMAs per 9 loads and took 10% of the time for 6% of the work).
  std::vector<Unit> tiles;
  for (size_t o = 0; o < plan.out_sizes.size(); ++o) {
    const int64_t np = (plan.out_sizes[o] + PW - 1) / PW;
    const int64_t nt = (np + PMAX - 1) / PMAX;
    for (int64_t t = 0, p = 0; t < nt; ++t) {
      const int64_t size = np / nt + (t < np % nt ? 1 : 0);
      tiles.push_back({static_cast<int32_t>(o), static_cast<int32_t>(p), static_cast<int32_t>(size)});
      p += size;
    }
  }
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  // Row groups: up to 16 micro-panels (128 rows with AVX-512) share a tile's weight panels while they sit in L2.
  const int64_t group = std::min<int64_t>(nmp, 16);
  const int64_t ngroups = (nmp + group - 1) / group;
  const int64_t units = ntiles * ngroups;
  std::vector<int64_t> seg_panel_off(plan.out_sizes.size());
  for (size_t o = 0; o < plan.out_sizes.size(); ++o)
    seg_panel_off[o] = plan.panel_offset(static_cast<int64_t>(o), static_cast<int>(sizeof(T)));

  auto run_unit = [&](int64_t u) {
    const Unit& t = tiles[u / ngroups];
    const int64_t g = u % ngroups;
    const int64_t o = t.seg;
    const int64_t K = plan.k_of_out[o];
    TileArgs<T> a;
    a.ranges = plan.ranges[o].data();
    a.nranges = static_cast<int>(plan.ranges[o].size());
    a.il = il;
    a.kpan = K * PW;
    a.wp = packed + seg_panel_off[o] + static_cast<int64_t>(t.panel) * K * PW;
    const int64_t col0 = plan.out_start[o] + static_cast<int64_t>(t.panel) * PW;
    a.cols = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(t.npanel) * PW, plan.out_sizes[o] - t.panel * PW));
    a.bias = bias ? bias + col0 : nullptr;
    a.act = plan.act;
    for (int64_t mp = g * group; mp < std::min(nmp, (g + 1) * group); ++mp) {
      a.xp = xp + mp * I * il;
      a.rows = static_cast<int>(std::min<int64_t>(il, rows - mp * il));
      a.y = y + mp * il * sy + col0;
      a.sy = sy;
      table.fn[a.rows - 1][t.npanel - 1](a);
    }
  };

  const int64_t work = rows * plan.macs_per_row;
  int nt = work >= plan.parallel_min_macs ? resolve_threads(threads) : 1;
  nt = static_cast<int>(std::min<int64_t>(nt, units));
  if (nt <= 1) {
    for (int64_t u = 0; u < units; ++u) run_unit(u);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t u = 0; u < units; ++u) run_unit(u);
#else
  for (int64_t u = 0; u < units; ++u) run_unit(u);
#endif
}

enum Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// Drivers: the packing loop of x runs in the variant's instruction set too.
#if defined(__x86_64__) || defined(__i386__)
#define PF_HAS_X86_VARIANTS 1
template <typename T>
__attribute__((target("avx512f,fma"), noinline)) void forward_avx512(const Plan& p, const T* x, int64_t rows,
                                                                     int64_t sx, const T* w, const T* b, T* y,
                                                                     int64_t sy, int threads) {
  forward_impl<T, 8, 3>(p, x, rows, sx, w, b, y, sy, threads, table<T, Avx512Tiles, 8, 3>());
}
template <typename T>
__attribute__((target("avx2,fma"), noinline)) void forward_avx2(const Plan& p, const T* x, int64_t rows, int64_t sx,
                                                                const T* w, const T* b, T* y, int64_t sy,
                                                                int threads) {
  forward_impl<T, 6, 1>(p, x, rows, sx, w, b, y, sy, threads, table<T, Avx2Tiles, 6, 1>());
}
#endif
template <typename T>
__attribute__((noinline)) void forward_default(const Plan& p, const T* x, int64_t rows, int64_t sx, const T* w,
                                               const T* b, T* y, int64_t sy, int threads) {
  forward_impl<T, 2, 1>(p, x, rows, sx, w, b, y, sy, threads, table<T, DefaultTiles, 2, 1>());
}

int best_isa() {
#ifdef PF_HAS_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kDefault;
}

const int kBestIsa = best_isa();
std::atomic<int> g_isa{kBestIsa};

const char* isa_name(int isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "default"; }

// Row accessor of the weights in storage order: calls f(k, value) for the K_o weights of output row r of segment o.
template <typename T>
void check_standard(const Plan& plan) {
  const size_t n = plan.out_sizes.size();
  PF_CHECK(n >= 2 && plan.in_sizes.size() == n && n - 1 <= 64,
           "partial_linear (panels): the 3-buffer format needs the layout [shared, branch_1, ..., branch_K] on both "
           "sides; got ", plan.in_sizes.size(), " input and ", n, " output segments");
  const uint64_t all = (n - 1 == 64) ? ~uint64_t(0) : ((uint64_t(1) << (n - 1)) - 1);
  for (size_t s = 0; s < n; ++s) {
    const uint64_t want = s == 0 ? all : uint64_t(1) << (s - 1);
    PF_CHECK(plan.in_masks[s] == want && plan.out_masks[s] == want,
             "partial_linear (panels): the 3-buffer format needs masks [all members, member 1, ..., member K]; "
             "segment ", s, " has input mask ", plan.in_masks[s], " and output mask ", plan.out_masks[s],
             " (expected ", want, ")");
  }
}

}  // namespace

Plan::Plan(const std::vector<int64_t>& is, const std::vector<uint64_t>& im, const std::vector<int64_t>& os,
           const std::vector<uint64_t>& om, int activation)
    : in_sizes(is), out_sizes(os), in_masks(im), out_masks(om) {
  PF_CHECK(!is.empty() && is.size() == im.size(), "partial_linear (panels): in_sizes and in_masks must be non-empty "
           "and of equal length; got ", is.size(), " and ", im.size());
  PF_CHECK(!os.empty() && os.size() == om.size(), "partial_linear (panels): out_sizes and out_masks must be "
           "non-empty and of equal length; got ", os.size(), " and ", om.size());
  PF_CHECK(activation >= 0 && activation <= 3,
           "partial_linear (panels): activation must be 0 (none), 1 (relu), 2 (gelu) or 3 (silu); got ", activation);
  act = static_cast<Activation>(activation);
  for (size_t s = 0; s < is.size(); ++s) {
    PF_CHECK(is[s] >= 0, "partial_linear (panels): in_sizes must be >= 0; entry ", s, " is ", is[s]);
    PF_CHECK(is[s] == 0 || im[s] != 0, "partial_linear (panels): in_masks[", s, "] is 0 for a non-empty segment "
             "(no member owns its slots)");
    in_start.push_back(i_total);
    i_total += is[s];
  }
  for (size_t s = 0; s < os.size(); ++s) {
    PF_CHECK(os[s] >= 0, "partial_linear (panels): out_sizes must be >= 0; entry ", s, " is ", os[s]);
    PF_CHECK(os[s] == 0 || om[s] != 0, "partial_linear (panels): out_masks[", s, "] is 0 for a non-empty segment "
             "(no member owns its slots)");
    out_start.push_back(o_total);
    o_total += os[s];
  }
  segment_offset.push_back(0);
  for (size_t o = 0; o < os.size(); ++o) {
    std::vector<Range> rg;
    int64_t k = 0;
    for (size_t i = 0; i < is.size(); ++i) {
      if (is[i] == 0 || (om[o] & im[i]) == 0) continue;
      if (!rg.empty() && rg.back().start + rg.back().len == in_start[i]) {
        rg.back().len += is[i];
      } else {
        rg.push_back({in_start[i], is[i]});
      }
      k += is[i];
    }
    ranges.push_back(std::move(rg));
    k_of_out.push_back(k);
    macs_per_row += os[o] * k;
    segment_offset.push_back(segment_offset.back() + os[o] * k);
  }
}

int64_t Plan::panel_offset(int64_t o, int elem_bytes) const {
  PF_CHECK(elem_bytes == 4 || elem_bytes == 8, "partial_linear (panels): element size must be 4 or 8 bytes");
  const int64_t pw = 64 / elem_bytes;
  int64_t off = 0;
  for (int64_t s = 0; s < o; ++s) off += (out_sizes[s] + pw - 1) / pw * pw * k_of_out[s];
  return off;
}

template <typename T>
void pack_segments(const Plan& plan, const T* src, T* dst) {
  constexpr int64_t PW = panel_width<T>();
  for (size_t o = 0; o < plan.out_sizes.size(); ++o) {
    const int64_t O = plan.out_sizes[o], K = plan.k_of_out[o];
    const T* w = src + plan.segment_offset[o];
    T* d = dst + plan.panel_offset(static_cast<int64_t>(o), sizeof(T));
    const int64_t np = (O + PW - 1) / PW;
    for (int64_t p = 0; p < np; ++p) {
      T* dp = d + p * K * PW;
      for (int64_t j = 0; j < PW; ++j) {
        const int64_t r = p * PW + j;
        if (r < O) {
          const T* wr = w + r * K;
          for (int64_t k = 0; k < K; ++k) dp[k * PW + j] = wr[k];
        } else {
          for (int64_t k = 0; k < K; ++k) dp[k * PW + j] = T(0);
        }
      }
    }
  }
}

template <typename T>
void pack_blocks(const Plan& plan, const T* ws, const T* wc, const T* wd, T* dst) {
  check_standard<T>(plan);
  constexpr int64_t PW = panel_width<T>();
  const int64_t i_s = plan.in_sizes[0], I = plan.i_total;
  int64_t c0 = 0, d0 = 0;
  for (size_t o = 0; o < plan.out_sizes.size(); ++o) {
    const int64_t O = plan.out_sizes[o], K = plan.k_of_out[o];
    const int64_t i_k = o == 0 ? 0 : plan.in_sizes[o];
    T* d = dst + plan.panel_offset(static_cast<int64_t>(o), sizeof(T));
    const int64_t np = (O + PW - 1) / PW;
    for (int64_t p = 0; p < np; ++p) {
      T* dp = d + p * K * PW;
      for (int64_t j = 0; j < PW; ++j) {
        const int64_t r = p * PW + j;
        if (r >= O) {
          for (int64_t k = 0; k < K; ++k) dp[k * PW + j] = T(0);
        } else if (o == 0) {
          for (int64_t k = 0; k < I; ++k) dp[k * PW + j] = ws[r * I + k];
        } else {
          // Branch row: shared input columns (w_cross), then branch o's own columns (w_diag block).
          for (int64_t k = 0; k < i_s; ++k) dp[k * PW + j] = wc[(c0 + r) * i_s + k];
          for (int64_t k = 0; k < i_k; ++k) dp[(i_s + k) * PW + j] = wd[d0 + r * i_k + k];
        }
      }
    }
    if (o > 0) {
      c0 += O;
      d0 += O * i_k;
    }
  }
}

template <typename T>
void unpack_dense(const Plan& plan, const T* packed, T* dense) {
  constexpr int64_t PW = panel_width<T>();
  const int64_t I = plan.i_total;
  std::fill(dense, dense + plan.o_total * I, T(0));
  for (size_t o = 0; o < plan.out_sizes.size(); ++o) {
    const int64_t O = plan.out_sizes[o], K = plan.k_of_out[o];
    const T* d = packed + plan.panel_offset(static_cast<int64_t>(o), sizeof(T));
    for (int64_t r = 0; r < O; ++r) {
      const T* dp = d + (r / PW) * K * PW + (r % PW);
      T* out = dense + (plan.out_start[o] + r) * I;
      int64_t k = 0;
      for (const Range& rg : plan.ranges[o])
        for (int64_t c = 0; c < rg.len; ++c, ++k) out[rg.start + c] = dp[k * PW];
    }
  }
}

template <typename T>
void forward(const Plan& plan, const T* x, int64_t rows, int64_t sx, const T* packed, const T* bias, T* y, int64_t sy,
             int num_threads) {
  PF_CHECK(rows >= 0, "partial_linear (panels): rows must be >= 0; got ", rows);
  PF_CHECK(sx >= 0 && sy >= plan.o_total, "partial_linear (panels): row strides must be x >= 0 and y >= O_total = ",
           plan.o_total, "; got ", sx, " and ", sy);
  if (rows == 0 || plan.o_total == 0) return;
#ifdef PF_HAS_X86_VARIANTS
  switch (g_isa.load(std::memory_order_relaxed)) {
    case kAvx512:
      return forward_avx512<T>(plan, x, rows, sx, packed, bias, y, sy, num_threads);
    case kAvx2:
      return forward_avx2<T>(plan, x, rows, sx, packed, bias, y, sy, num_threads);
    default:
      break;
  }
#endif
  forward_default<T>(plan, x, rows, sx, packed, bias, y, sy, num_threads);
}

std::string isa() { return isa_name(g_isa.load()); }

void set_isa(const std::string& name) {
  int want = -1;
  if (name == "auto") want = kBestIsa;
  if (name == "avx512") want = kAvx512;
  if (name == "avx2") want = kAvx2;
  if (name == "default") want = kDefault;
  PF_CHECK(want >= 0, "partial_linear (panels) set_isa: name must be 'auto', 'avx512', 'avx2' or 'default'; got '",
           name, "'");
  PF_CHECK(want <= kBestIsa, "partial_linear (panels) set_isa: this CPU (or build) supports up to '",
           isa_name(kBestIsa), "'; got '", name, "'");
  g_isa.store(want);
}

template void pack_segments<float>(const Plan&, const float*, float*);
template void pack_segments<double>(const Plan&, const double*, double*);
template void pack_blocks<float>(const Plan&, const float*, const float*, const float*, float*);
template void pack_blocks<double>(const Plan&, const double*, const double*, const double*, double*);
template void unpack_dense<float>(const Plan&, const float*, float*);
template void unpack_dense<double>(const Plan&, const double*, double*);
template void forward<float>(const Plan&, const float*, int64_t, int64_t, const float*, const float*, float*, int64_t,
                             int);
template void forward<double>(const Plan&, const double*, int64_t, int64_t, const double*, const double*, double*,
                              int64_t, int);

}  // namespace pyfusion::panel_linear
