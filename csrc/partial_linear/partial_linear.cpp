// Small-batch CPU kernel of a partially fused linear layer: GEMV-style dot products over the packed blocks,
// up to 4 input rows per weight-row pass, bias and activation fused, one call for the whole layer.
#include "partial_linear/partial_linear.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>

#include "common.h"

// The vector helpers below are always inlined into the ISA-specific variants, so no vector ever
// crosses a call boundary; GCC still warns about the ABI of their (never emitted) out-of-line forms.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace pyfusion::partial_linear {

namespace {

#define PF_INLINE inline __attribute__((always_inline))

// B-byte vectors of T (GCC vector extensions), B = the variant's native register width: 64 with AVX-512,
// 32 with AVX2, 16 otherwise (a vector wider than the target's registers is lowered element by element:
// measured 2-4x slower at 1 row, 459k multiply-adds). aligned(sizeof(T)) makes a dereference an unaligned load.
template <typename T, int B>
struct Vec {
  typedef T type __attribute__((vector_size(B), aligned(sizeof(T))));
  static constexpr int width = B / static_cast<int>(sizeof(T));
};

template <typename T, int B>
PF_INLINE typename Vec<T, B>::type load(const T* p) {
  return *reinterpret_cast<const typename Vec<T, B>::type*>(p);
}

// acc[r][u] += w[j] * x_r[j] over n columns, 4 / R independent vector accumulators per row (4 FMA chains
// in flight whatever R is); the n % W leftover goes to the scalar tail[r].
template <typename T, int B, int R>
PF_INLINE void accumulate(const T* w, const T* x, int64_t sx, int64_t n, typename Vec<T, B>::type (&acc)[R][4 / R],
                          T (&tail)[R]) {
  constexpr int U = 4 / R;
  constexpr int W = Vec<T, B>::width;
  int64_t j = 0;
  for (; j + U * W <= n; j += U * W) {
    for (int u = 0; u < U; ++u) {
      const auto wv = load<T, B>(w + j + u * W);
      for (int r = 0; r < R; ++r) acc[r][u] += wv * load<T, B>(x + r * sx + j + u * W);
    }
  }
  for (; j + W <= n; j += W) {
    const auto wv = load<T, B>(w + j);
    for (int r = 0; r < R; ++r) acc[r][0] += wv * load<T, B>(x + r * sx + j);
  }
  for (; j < n; ++j) {
    for (int r = 0; r < R; ++r) tail[r] += w[j] * x[r * sx + j];
  }
}

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

// One output row o for rows [m0, m0 + R): y[m, o] = act(b + <w1, x[m, off1:off1+n1]> + <w2, x[m, off2:off2+n2]>).
template <typename T, int B, int R>
PF_INLINE void output_row(const T* w1, int64_t n1, const T* w2, int64_t off2, int64_t n2, const T* x, int64_t sx,
                          T b, Activation act, T* y, int64_t o_total) {
  typename Vec<T, B>::type acc[R][4 / R];
  T tail[R];
  for (int r = 0; r < R; ++r) {
    tail[r] = T(0);
    for (int u = 0; u < 4 / R; ++u) acc[r][u] = typename Vec<T, B>::type{};
  }
  accumulate<T, B, R>(w1, x, sx, n1, acc, tail);
  if (n2 > 0) accumulate<T, B, R>(w2, x + off2, sx, n2, acc, tail);
  for (int r = 0; r < R; ++r) {
    auto v = acc[r][0];
    for (int u = 1; u < 4 / R; ++u) v += acc[r][u];
    T s = tail[r] + b;
    for (int i = 0; i < Vec<T, B>::width; ++i) s += v[i];
    y[r * o_total] = activate(s, act);
  }
}

template <typename T, int B>
PF_INLINE void rows_block(const T* w1, int64_t n1, const T* w2, int64_t off2, int64_t n2, const T* x, int64_t rows,
                          int64_t sx, T b, Activation act, T* y, int64_t o_total) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) output_row<T, B, 4>(w1, n1, w2, off2, n2, x + m * sx, sx, b, act, y + m * o_total, o_total);
  switch (rows - m) {
    case 3:
      output_row<T, B, 3>(w1, n1, w2, off2, n2, x + m * sx, sx, b, act, y + m * o_total, o_total);
      break;
    case 2:
      output_row<T, B, 2>(w1, n1, w2, off2, n2, x + m * sx, sx, b, act, y + m * o_total, o_total);
      break;
    case 1:
      output_row<T, B, 1>(w1, n1, w2, off2, n2, x + m * sx, sx, b, act, y + m * o_total, o_total);
      break;
    default:
      break;
  }
}

struct Args {
  const Plan* plan;
  const void* x;
  int64_t rows, sx;
  const void *ws, *wc, *wd, *bias;
  void* y;
};

// Output rows [o_begin, o_end) of every input row, walking the segments that overlap the range.
template <typename T, int B>
PF_INLINE void compute_range(const Args& a, int64_t o_begin, int64_t o_end) {
  const Plan& p = *a.plan;
  const T* x = static_cast<const T*>(a.x);
  const T* ws = static_cast<const T*>(a.ws);
  const T* wc = static_cast<const T*>(a.wc);
  const T* wd = static_cast<const T*>(a.wd);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  const int64_t o_total = p.o_total, i_total = p.i_total, i_s = p.in_layout[0], o_s = p.out_layout[0];
  const int64_t kb = static_cast<int64_t>(p.out_layout.size()) - 1;
  // Shared output rows: one dot over all I_total input columns.
  for (int64_t o = std::max<int64_t>(o_begin, 0); o < std::min(o_end, o_s); ++o) {
    rows_block<T, B>(ws + o * i_total, i_total, nullptr, 0, 0, x, a.rows, a.sx, bias ? bias[o] : T(0), p.act, y + o,
                  o_total);
  }
  // Branch k rows: the cross row on the shared input, then the diagonal block's row on branch k's input.
  int64_t o0 = o_s, c0 = 0, i0 = i_s, d0 = 0;
  for (int64_t k = 1; k <= kb && o0 < o_end; ++k) {
    const int64_t o_k = p.out_layout[k], i_k = p.in_layout[k];
    const int64_t lo = std::max(o_begin, o0), hi = std::min(o_end, o0 + o_k);
    for (int64_t o = lo; o < hi; ++o) {
      const int64_t r = o - o0;
      rows_block<T, B>(wc + (c0 + r) * i_s, i_s, wd + d0 + r * i_k, i0, i_k, x, a.rows, a.sx, bias ? bias[o] : T(0),
                    p.act, y + o, o_total);
    }
    o0 += o_k;
    c0 += o_k;
    i0 += i_k;
    d0 += o_k * i_k;
  }
}

// The same source compiled three times: AVX-512F+FMA, AVX2+FMA and the baseline x86-64 (or another
// architecture's default); picked at run time with __builtin_cpu_supports (FMA is its own CPU flag, which
// target_clones("avx2") would not enable).
#if defined(__x86_64__) || defined(__i386__)
#define PF_DEFINE_VARIANT(NAME, TARGET, BYTES)                                               \
  template <typename T>                                                                      \
  __attribute__((target(TARGET), noinline)) void NAME(const Args& a, int64_t b, int64_t e) { \
    compute_range<T, BYTES>(a, b, e);                                                        \
  }
PF_DEFINE_VARIANT(range_avx512, "avx512f,fma", 64)
PF_DEFINE_VARIANT(range_avx2, "avx2,fma", 32)
#define PF_HAS_X86_VARIANTS 1
#endif

template <typename T>
__attribute__((noinline)) void range_default(const Args& a, int64_t b, int64_t e) {
  compute_range<T, 16>(a, b, e);
}

template <typename T>
using RangeFn = void (*)(const Args&, int64_t, int64_t);

enum Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

int best_isa() {
#ifdef PF_HAS_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kDefault;
}

const int kBestIsa = best_isa();
// The variant in use: the best one the CPU supports, or a lower one forced with set_isa (tests run every
// variant on one machine this way). A relaxed atomic load per call.
std::atomic<int> g_isa{kBestIsa};

template <typename T>
RangeFn<T> variant() {
#ifdef PF_HAS_X86_VARIANTS
  switch (g_isa.load(std::memory_order_relaxed)) {
    case kAvx512:
      return &range_avx512<T>;
    case kAvx2:
      return &range_avx2<T>;
    default:
      break;
  }
#endif
  return &range_default<T>;
}

const char* isa_name(int isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "default"; }

}  // namespace

Plan::Plan(const std::vector<int64_t>& il, const std::vector<int64_t>& ol, int activation)
    : in_layout(il), out_layout(ol) {
  PF_CHECK(il.size() >= 2 && il.size() == ol.size(),
           "partial_linear plan: in_layout and out_layout must be [shared, branch_1, ..., branch_K] with the same "
           "K >= 1; got ",
           il.size(), " and ", ol.size(), " entries");
  PF_CHECK(activation >= 0 && activation <= 3,
           "partial_linear plan: activation must be 0 (none), 1 (relu), 2 (gelu) or 3 (silu); got ", activation);
  act = static_cast<Activation>(activation);
  for (size_t k = 0; k < il.size(); ++k) {
    PF_CHECK(il[k] >= 0 && ol[k] >= 0, "partial_linear plan: layout sizes must be >= 0; entry ", k, " is (in ",
             il[k], ", out ", ol[k], ")");
    i_total += il[k];
    o_total += ol[k];
  }
  macs_per_row = ol[0] * i_total;
  for (size_t k = 1; k < il.size(); ++k) macs_per_row += ol[k] * (il[0] + il[k]);
}

template <typename T>
void forward(const Plan& plan, const T* x, int64_t rows, int64_t x_row_stride, const T* w_shared, const T* w_cross,
             const T* w_diag, const T* bias, T* y, int num_threads) {
  PF_CHECK(rows >= 0, "partial_linear: rows must be >= 0; got ", rows);
  if (rows == 0 || plan.o_total == 0) return;
  // Rows may overlap (a stride-0 broadcast row, for instance): x is only read.
  PF_CHECK(x_row_stride >= 0, "partial_linear: x's row stride must be >= 0; got ", x_row_stride);
  Args a{&plan, x, rows, x_row_stride, w_shared, w_cross, w_diag, bias, y};
  const RangeFn<T> fn = variant<T>();
  const int64_t work = rows * plan.macs_per_row;
  int threads = work >= plan.parallel_min_macs ? resolve_threads(num_threads) : 1;
  // At least 16 output rows per thread (one cache line of y per row block).
  threads = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, plan.o_total / 16)));
  if (threads <= 1) {
    fn(a, 0, plan.o_total);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    // Equal shares of output rows, rounded to 16 so that threads do not share a cache line of a y row.
    const int64_t per = ((plan.o_total + nt - 1) / nt + 15) / 16 * 16;
    const int64_t b = std::min<int64_t>(plan.o_total, t * per), e = std::min<int64_t>(plan.o_total, b + per);
    if (b < e) fn(a, b, e);
  }
#else
  fn(a, 0, plan.o_total);
#endif
}

std::string isa() { return isa_name(g_isa.load()); }

void set_isa(const std::string& name) {
  int want = -1;
  if (name == "auto") want = kBestIsa;
  if (name == "avx512") want = kAvx512;
  if (name == "avx2") want = kAvx2;
  if (name == "default") want = kDefault;
  PF_CHECK(want >= 0, "partial_linear set_isa: name must be 'auto', 'avx512', 'avx2' or 'default'; got '", name, "'");
  PF_CHECK(want <= kBestIsa, "partial_linear set_isa: this CPU (or build) supports up to '", isa_name(kBestIsa),
           "'; got '", name, "'");
  g_isa.store(want);
}

template void forward<float>(const Plan&, const float*, int64_t, int64_t, const float*, const float*, const float*,
                             const float*, float*, int);
template void forward<double>(const Plan&, const double*, int64_t, int64_t, const double*, const double*,
                              const double*, const double*, double*, int);

}  // namespace pyfusion::partial_linear
