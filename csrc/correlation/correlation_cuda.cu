// CUDA kernel of the correlation engine: same semantics as correlation_cpu.cpp (shifted first moment and
// lower triangle of the shifted second moment, float64 state), on device pointers and the caller's stream.
//
// s2 (a SYRK in the SIMT-SGEMM style): one thread block per (128 x 128 lower-triangle tile, chunk of samples);
// 256 threads, each 8 x 8 entries (four 4 x 4 sub-tiles 64 apart, so the float4 shared-memory reads are
// conflict-free), stages of 8 samples double-buffered in shared memory with the next stage's global loads in flight
// during the current stage's 512 FMAs per thread. Products are summed in float32 over kFlush = 64 samples at most
// (the CPU kernel's depth, so both paths have the same float64-grade error), then added to float64 registers; each
// block adds its float64 tile to s2 with atomicAdd (sm_60+). The chunk count is chosen so that tiles x chunks fill
// the GPU twice. (The first version used 64 x 64 tiles with 4 x 4 per thread: 2 FMAs per shared-memory load and a
// 2-way bank conflict on every B read, i.e. at most half the SIMT peak.)
// s1: one thread per column and chunk of 4096 rows, float64 sums, atomicAdd.
#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"
#include "correlation/correlation.h"

namespace pyfusion {
namespace correlation {
namespace {

constexpr int kBM = 128;          // tile edge
constexpr int kBK = 8;            // samples per shared-memory stage
constexpr int kThreads = 256;     // 16 x 16 threads, 8 x 8 entries each
constexpr int kFlush = 64;        // samples per float32 partial sum (the CPU kernel's kDepth)
constexpr int64_t kChunk1 = 4096;  // rows per block of the first-moment kernel

__device__ __forceinline__ float load_val(const float* p) { return *p; }
__device__ __forceinline__ float load_val(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_val(const uint16_t* p) {
  return __uint_as_float(static_cast<uint32_t>(*p) << 16);
}

template <typename T>
__global__ void first_moment_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t sn, int64_t sd,
                                    const double* __restrict__ shift, double* __restrict__ s1) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= d) return;
  const int64_t r0 = blockIdx.y * kChunk1;
  const int64_t r1 = min(n, r0 + kChunk1);
  const float c = static_cast<float>(shift[j]);
  double acc = 0.0;
  // v = x - c in float32, as the CPU kernel and the second moment below (c is float32-representable).
  for (int64_t r = r0; r < r1; ++r) acc += static_cast<double>(load_val(x + r * sn + j * sd) - c);
  atomicAdd(s1 + j, acc);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    second_moment_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t sn, int64_t sd,
                         const double* __restrict__ shift, double* __restrict__ s2, int64_t chunk) {
  // Lower-triangle tile index t -> (ti, tj), ti >= tj, t = ti (ti + 1) / 2 + tj.
  const int64_t t = blockIdx.x;
  int64_t ti = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) / 2.0);
  while (ti * (ti + 1) / 2 > t) --ti;
  while ((ti + 1) * (ti + 2) / 2 <= t) ++ti;
  const int64_t tj = t - ti * (ti + 1) / 2;
  const int64_t i0 = ti * kBM, j0 = tj * kBM;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t r1 = min(n, r0 + chunk);

  __shared__ __align__(16) float As[2][kBK][kBM];
  __shared__ __align__(16) float Bs[2][kBK][kBM];
  __shared__ float ci[kBM], cj[kBM];
  const int tid = threadIdx.x;
  if (tid < kBM) {
    ci[tid] = i0 + tid < d ? static_cast<float>(shift[i0 + tid]) : 0.f;
    cj[tid] = j0 + tid < d ? static_cast<float>(shift[j0 + tid]) : 0.f;
  }
  __syncthreads();

  // Loader: sample row lk of the stage, columns lc .. lc + 3 of both operands (coalesced along the columns).
  const int lk = tid >> 5, lc = (tid & 31) * 4;
  float ra[4], rb[4];
  auto load_stage = [&](int64_t r) {
    const int64_t row = r + lk;
    const bool in = row < r1;
    const T* xr = x + row * sn;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t a = i0 + lc + q, b = j0 + lc + q;
      ra[q] = in && a < d ? load_val(xr + a * sd) - ci[lc + q] : 0.f;
      rb[q] = in && b < d ? load_val(xr + b * sd) - cj[lc + q] : 0.f;
    }
  };
  auto store_stage = [&](int buf) {
    *reinterpret_cast<float4*>(&As[buf][lk][lc]) = make_float4(ra[0], ra[1], ra[2], ra[3]);
    *reinterpret_cast<float4*>(&Bs[buf][lk][lc]) = make_float4(rb[0], rb[1], rb[2], rb[3]);
  };

  const int tx = tid & 15, ty = tid >> 4;
  float acc[8][8];
  double accd[8][8];
#pragma unroll
  for (int u = 0; u < 8; ++u)
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      acc[u][v] = 0.f;
      accd[u][v] = 0.0;
    }
  load_stage(r0);
  store_stage(0);
  __syncthreads();
  int buf = 0, since = 0;
  for (int64_t r = r0; r < r1; r += kBK) {
    const bool more = r + kBK < r1;
    if (more) load_stage(r + kBK);  // in flight during this stage's FMAs
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][k][ty * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][k][64 + ty * 4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&Bs[buf][k][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&Bs[buf][k][64 + tx * 4]);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int u = 0; u < 8; ++u)
#pragma unroll
        for (int v = 0; v < 8; ++v) acc[u][v] = fmaf(a[u], b[v], acc[u][v]);
    }
    since += kBK;
    if (since == kFlush) {  // uniform across the block
#pragma unroll
      for (int u = 0; u < 8; ++u)
#pragma unroll
        for (int v = 0; v < 8; ++v) {
          accd[u][v] += static_cast<double>(acc[u][v]);
          acc[u][v] = 0.f;
        }
      since = 0;
    }
    if (more) store_stage(buf ^ 1);
    __syncthreads();  // the next stage is visible, and nobody still reads the buffer the stage after overwrites
    buf ^= 1;
  }
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int64_t i = i0 + (u < 4 ? ty * 4 + u : 64 + ty * 4 + u - 4);
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      const int64_t j = j0 + (v < 4 ? tx * 4 + v : 64 + tx * 4 + v - 4);
      if (i < d && j <= i) atomicAdd(s2 + i * d + j, accd[u][v] + static_cast<double>(acc[u][v]));
    }
  }
}

template <typename T>
void launch(const T* x, int64_t n, int64_t d, int64_t sn, int64_t sd, const double* shift, double* s1, double* s2,
            cudaStream_t stream) {
  const int64_t chunks1 = (n + kChunk1 - 1) / kChunk1;
  PF_CHECK(chunks1 < 65536, "correlation (CUDA): at most ", 65535 * kChunk1, " rows per call; got ", n);
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("correlation (CUDA): no usable CUDA device or driver (") +
                             cudaGetErrorString(err) + ")");
  dim3 g1(static_cast<unsigned>((d + 255) / 256), static_cast<unsigned>(chunks1));
  first_moment_kernel<T><<<g1, 256, 0, stream>>>(x, n, d, sn, sd, shift, s1);
  const int64_t tiles = (d + kBM - 1) / kBM;
  const int64_t ntri = tiles * (tiles + 1) / 2;
  // Two waves of blocks (one block per SM fits: 16 KiB of shared memory, ~230 registers per thread), chunks of at
  // least 512 samples so that the atomic epilogue stays small next to the FMAs (512 samples: 64 FMAs per atomic).
  int64_t chunks = std::max<int64_t>(1, (2 * static_cast<int64_t>(sms) + ntri - 1) / ntri);
  chunks = std::min<int64_t>({chunks, std::max<int64_t>(1, n / 512), 65535});
  const int64_t chunk = (n + chunks - 1) / chunks;
  chunks = (n + chunk - 1) / chunk;
  dim3 g2(static_cast<unsigned>(ntri), static_cast<unsigned>(chunks));
  second_moment_kernel<T><<<g2, kThreads, 0, stream>>>(x, n, d, sn, sd, shift, s2, chunk);
  err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("correlation (CUDA): kernel launch failed: ") + cudaGetErrorString(err));
}

}  // namespace

void accumulate_cuda(const void* x, DType dtype, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d,
                     const double* shift, double* s1, double* s2, void* stream) {
  PF_CHECK(n >= 0 && d >= 0, "correlation: x must have non-negative shape (n, d); got (", n, ", ", d, ")");
  if (n == 0 || d == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch(static_cast<const float*>(x), n, d, stride_n, stride_d, shift, s1, s2, s);
    case DType::kFloat16:
      return launch(static_cast<const __half*>(x), n, d, stride_n, stride_d, shift, s1, s2, s);
    case DType::kBFloat16:
      return launch(static_cast<const uint16_t*>(x), n, d, stride_n, stride_d, shift, s1, s2, s);
  }
  fail("correlation: unknown dtype code ", static_cast<int>(dtype));
}

}  // namespace correlation
}  // namespace pyfusion
