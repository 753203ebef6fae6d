// CUDA kernel of the correlation engine: same semantics as correlation_cpu.cpp (shifted first moment and
// lower triangle of the shifted second moment, float64 state), on device pointers and the caller's stream.
//
// s2: one thread block per (64 x 64 lower-triangle tile, chunk of kChunk rows); 256 threads compute 4 x 4
// entries each from shared-memory stripes of 32 rows. Products are summed in float32 over 256 rows at most,
// then flushed into float64 registers, and each block adds its float64 tile to s2 with atomicAdd (sm_60+).
#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "correlation/correlation.h"

namespace pyfusion {
namespace correlation {
namespace {

constexpr int kTile = 64;
constexpr int kStripe = 32;
constexpr int kFlushRows = 256;   // float32 partial sums span at most this many rows (as the CPU panel)
constexpr int64_t kChunk = 4096;  // rows per block: enough blocks to fill the GPU at N >= 64k


__device__ __forceinline__ float load_val(const float* p) { return *p; }
__device__ __forceinline__ float load_val(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_val(const uint16_t* p) {
  return __uint_as_float(static_cast<uint32_t>(*p) << 16);
}

template <typename T>
__global__ void first_moment_kernel(const T* x, int64_t n, int64_t d, int64_t sn, int64_t sd, const double* shift,
                                    double* s1) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= d) return;
  const int64_t r0 = blockIdx.y * kChunk;
  const int64_t r1 = min(n, r0 + kChunk);
  const double c = shift[j];
  double acc = 0.0;
  for (int64_t r = r0; r < r1; ++r) acc += static_cast<double>(load_val(x + r * sn + j * sd)) - c;
  atomicAdd(s1 + j, acc);
}

template <typename T>
__global__ void second_moment_kernel(const T* x, int64_t n, int64_t d, int64_t sn, int64_t sd, const double* shift,
                                     double* s2) {
  // Decode the lower-triangle tile index t -> (ti, tj), ti >= tj, t = ti (ti + 1) / 2 + tj.
  const int64_t t = blockIdx.x;
  int64_t ti = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) / 2.0);
  while (ti * (ti + 1) / 2 > t) --ti;
  while ((ti + 1) * (ti + 2) / 2 <= t) ++ti;
  const int64_t tj = t - ti * (ti + 1) / 2;
  const int64_t i0 = ti * kTile, j0 = tj * kTile;
  const int64_t r0 = blockIdx.y * kChunk;
  const int64_t r1 = min(n, r0 + kChunk);

  __shared__ float As[kStripe][kTile];
  __shared__ float Bs[kStripe][kTile];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  double accd[4][4] = {};
  int since_flush = 0;
  for (int64_t r = r0; r < r1; r += kStripe) {
    for (int e = threadIdx.x; e < kStripe * kTile; e += blockDim.x) {
      const int rr = e / kTile, cc = e % kTile;
      const int64_t row = r + rr;
      float a = 0.f, b = 0.f;
      if (row < r1) {
        const T* xr = x + row * sn;
        if (i0 + cc < d) a = static_cast<float>(static_cast<double>(load_val(xr + (i0 + cc) * sd)) - shift[i0 + cc]);
        if (j0 + cc < d) b = static_cast<float>(static_cast<double>(load_val(xr + (j0 + cc) * sd)) - shift[j0 + cc]);
      }
      As[rr][cc] = a;
      Bs[rr][cc] = b;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kStripe; ++k) {
      float av[4], bv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        av[u] = As[k][ty * 4 + u];
        bv[u] = Bs[k][tx * 4 + u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(av[u], bv[v], acc[u][v]);
    }
    __syncthreads();
    since_flush += kStripe;
    if (since_flush >= kFlushRows) {
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          accd[u][v] += acc[u][v];
          acc[u][v] = 0.f;
        }
      since_flush = 0;
    }
  }
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t i = i0 + ty * 4 + u, j = j0 + tx * 4 + v;
      if (i < d && j < d && i >= j) atomicAdd(s2 + i * d + j, accd[u][v] + acc[u][v]);
    }
}

template <typename T>
void launch(const T* x, int64_t n, int64_t d, int64_t sn, int64_t sd, const double* shift, double* s1, double* s2,
            cudaStream_t stream) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  PF_CHECK(chunks < 65536, "correlation (CUDA): at most ", 65535 * kChunk, " rows per call; got ", n);
  dim3 g1(static_cast<unsigned>((d + 255) / 256), static_cast<unsigned>(chunks));
  first_moment_kernel<T><<<g1, 256, 0, stream>>>(x, n, d, sn, sd, shift, s1);
  const int64_t tiles = (d + kTile - 1) / kTile;
  dim3 g2(static_cast<unsigned>(tiles * (tiles + 1) / 2), static_cast<unsigned>(chunks));
  second_moment_kernel<T><<<g2, 256, 0, stream>>>(x, n, d, sn, sd, shift, s2);
  const cudaError_t err = cudaGetLastError();
  PF_CHECK(err == cudaSuccess, "correlation (CUDA): kernel launch failed: ", cudaGetErrorString(err));
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
