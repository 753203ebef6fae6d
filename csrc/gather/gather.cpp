// See gather.h. Why: for a VGG11 pair at alpha 0.25 (1 thread, 2-core Xeon VM), the feature gathers (torch
// index_select on axis 1 of 512 x 512 x 3 x 3) and the norms' separate pass (a chunked square-and-sum) were
// ~25 + ~15 ms of a ~200 ms fusion; see pyfusion/match/align.py for the measurement of this engine.
#include "gather/gather.h"

#include <cstring>

#include "common.h"

namespace pyfusion::gather {

namespace {

// the lane sums of squares of x[0, n); mul then add (contraction off: the same bits with or without FMA units)
#if defined(__GNUC__) && !defined(__clang__)
#define PF_GATHER_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define PF_GATHER_NO_CONTRACT
#endif

#if defined(__clang__)
#pragma clang fp contract(off)
#endif

template <int64_t L>
PF_GATHER_NO_CONTRACT inline __attribute__((always_inline)) double sum_squares_body(const double* x, int64_t n) {
  double acc[L] = {};
  int64_t e = 0;
  for (; e + L <= n; e += L)
    for (int64_t l = 0; l < L; ++l) {
      const double v = x[e + l] * x[e + l];
      acc[l] = acc[l] + v;
    }
  for (int64_t l = 0; e + l < n; ++l) {
    const double v = x[e + l] * x[e + l];
    acc[l] = acc[l] + v;
  }
  for (int64_t w = L / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] = acc[l] + acc[l + w];
  return acc[0];
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PF_GATHER_AVX512 1
PF_GATHER_NO_CONTRACT __attribute__((target("avx512f"))) double sum_squares_avx512(const double* x, int64_t n) {
  return sum_squares_body<kLanes>(x, n);
}
#endif

PF_GATHER_NO_CONTRACT double sum_squares_base(const double* x, int64_t n) { return sum_squares_body<kLanes>(x, n); }

bool use_avx512() {
#ifdef PF_GATHER_AVX512
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

#if defined(__GNUC__) || defined(__clang__)
#define PF_GATHER_PREFETCH(p) __builtin_prefetch(p)
#else
#define PF_GATHER_PREFETCH(p) ((void)(p))
#endif

// Entries ahead of the prefetch (the scatter engine's distance, csrc/scatter): the index is a permutation, so the
// hardware prefetchers cannot follow the 72-byte entries of a 3x3 conv. VGG11 pair at alpha 0.25, the 14 gathers of
// one fusion in place (1 thread, 2-core Xeon VM, runs without page faults): 28.5-30.5 ms without, 23.6-25 ms with.
constexpr int64_t kPrefetch = 64;

// one outer row; T: the inner size at compile time where it is common (1: Linear, 9: 3x3 conv; 0: runtime)
template <int64_t T>
void gather_row(const double* src, int64_t inner_rt, const int64_t* index, int64_t n_index, double* dst) {
  const int64_t inner = T > 0 ? T : inner_rt;
  for (int64_t j = 0; j < n_index; ++j) {
    const double* s = src + index[j] * inner;
    if (T != 1 && j + kPrefetch < n_index) {  // the entries come in index order, i.e. permuted: ask ahead
      const double* sn = src + index[j + kPrefetch] * inner;
      PF_GATHER_PREFETCH(sn);
      PF_GATHER_PREFETCH(sn + inner - 1);
    }
    double* d = dst + j * inner;
    if (T > 0) {
      for (int64_t t = 0; t < T; ++t) d[t] = s[t];
    } else {
      std::memcpy(d, s, sizeof(double) * inner);
    }
  }
}

}  // namespace

void gather_axis1_f64(const double* src, int64_t outer, int64_t n_axis, int64_t inner, const int64_t* index,
                      int64_t n_index, double* out, double* sq, int threads) {
  PF_CHECK(outer >= 0 && n_axis >= 0 && inner >= 1 && n_index >= 0, "gather_axis1: bad sizes (", outer, ", ",
           n_axis, ", ", inner, ", ", n_index, ")");
  for (int64_t j = 0; j < n_index; ++j)
    PF_CHECK(index[j] >= 0 && index[j] < n_axis, "gather_axis1: index ", j, " is ", index[j], ", outside [0, ",
             n_axis, ")");
  const bool avx = use_avx512();
  const int64_t row_in = n_axis * inner, row_out = n_index * inner;
  const int nt = resolve_threads(threads);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && outer * row_out > (1 << 16))
#endif
  for (int64_t o = 0; o < outer; ++o) {
    const double* s = src + o * row_in;
    double* d = out + o * row_out;
    if (inner == 9) gather_row<9>(s, inner, index, n_index, d);
    else if (inner == 1) gather_row<1>(s, inner, index, n_index, d);
    else gather_row<0>(s, inner, index, n_index, d);
    if (sq != nullptr) {
#ifdef PF_GATHER_AVX512
      sq[o] = avx ? sum_squares_avx512(d, row_out) : sum_squares_base(d, row_out);
#else
      sq[o] = sum_squares_base(d, row_out);
#endif
    }
  }
  (void)avx;
  (void)nt;
}

}  // namespace pyfusion::gather
