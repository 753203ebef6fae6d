// GPU path of batched exact linear assignment: the core of lsap_batch.h run by a warp (one problem per warp, four
// warps per block) or by a 256-thread block (one problem per block) per problem. The same core runs on the CPU
// with an emulated team in the tests, so the algorithm is checked without a GPU; this file only adds the teams,
// the workspace, the launches and the status round trip.
//
// Choice of team: warps for problems whose solved matrix has <= kWarpMaxCols columns (each Dijkstra step scans the
// row with 32 lanes and reduces with 5 shuffles, no block barrier), blocks above (256 lanes split the row; a step
// costs two __syncthreads). Problems are independent, so a batch fills the GPU with one warp or block each.
// Workspace (duals, distances, predecessors, the assignment; the transpose for n > m) lives in global memory,
// allocated stream-ordered (cudaMallocAsync) for the call.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "assignment/lsap_batch.h"
#include "common.h"

namespace pyfusion {
namespace lsap_batch {
namespace {

constexpr int64_t kWarpMaxCols = 1024;
constexpr int kWarpsPerBlock = 4;
constexpr int kBlockThreads = 256;
constexpr int kSlot = 32;  // bytes per reduction slot (Best2<double> is 24)

__device__ __forceinline__ int64_t shfl_xor(int64_t v, int off) {
  return static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(v), off));
}
__device__ __forceinline__ double shfl_xor(double v, int off) { return __shfl_xor_sync(0xffffffffu, v, off); }
template <typename T>
__device__ __forceinline__ Best<T> shfl_xor(const Best<T>& b, int off) {
  Best<T> r;
  r.val = __shfl_xor_sync(0xffffffffu, b.val, off);
  r.idx = __shfl_xor_sync(0xffffffffu, b.idx, off);
  r.busy = __shfl_xor_sync(0xffffffffu, b.busy, off);
  return r;
}

template <typename T>
__device__ __forceinline__ Best2<T> shfl_xor(const Best2<T>& b, int off) {
  Best2<T> r;
  r.u1 = __shfl_xor_sync(0xffffffffu, b.u1, off);
  r.u2 = __shfl_xor_sync(0xffffffffu, b.u2, off);
  r.j1 = __shfl_xor_sync(0xffffffffu, b.j1, off);
  r.j2 = __shfl_xor_sync(0xffffffffu, b.j2, off);
  return r;
}

// Butterfly: every lane ends with the reduction of all 32 (the operations are associative and commutative).
template <typename R, typename Op>
__device__ __forceinline__ R warp_reduce(R v, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, shfl_xor(v, off));
  return v;
}

struct WarpTeam {
  int lane;
  __device__ int lanes() const { return 32; }
  template <typename F>
  __device__ void each(F f) const {
    f(lane);
  }
  __device__ void sync() const { __syncwarp(); }
  template <typename F>
  __device__ void single(F f) const {
    if (lane == 0) f();
    __syncwarp();
  }
  template <typename R, typename F, typename Op>
  __device__ R reduce(F f, Op op) const {
    return warp_reduce(f(lane), op);
  }
};

struct BlockTeam {
  int tid;
  unsigned char* scratch;  // kBlockThreads / 32 reduction slots of kSlot bytes, in shared memory
  __device__ int lanes() const { return kBlockThreads; }
  template <typename F>
  __device__ void each(F f) const {
    f(tid);
  }
  __device__ void sync() const { __syncthreads(); }
  template <typename F>
  __device__ void single(F f) const {
    if (tid == 0) f();
    __syncthreads();
  }
  template <typename R, typename F, typename Op>
  __device__ R reduce(F f, Op op) const {
    static_assert(sizeof(R) <= kSlot, "a reduction slot holds kSlot bytes");
    R v = warp_reduce(f(tid), op);
    R* slots = reinterpret_cast<R*>(scratch);
    if ((tid & 31) == 0) slots[tid >> 5] = v;
    __syncthreads();
    R acc = slots[0];
#pragma unroll
    for (int w = 1; w < kBlockThreads / 32; ++w) acc = op(acc, slots[w]);
    __syncthreads();  // the slots may be reused by the next reduction
    return acc;
  }
};

template <typename T>
struct Desc {
  ProblemView<T> view;
  int64_t ws_offset;  // bytes into the workspace
  int64_t index;      // position in the caller's batch (output row)
};

template <typename T>
__global__ void warp_kernel(const Desc<T>* __restrict__ descs, int64_t count, Options opt, char* ws, int64_t* out,
                            int64_t stride, double* totals, Status* status) {
  const int64_t k = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (k >= count) return;  // whole warps leave together
  const Desc<T> d = descs[k];
  WarpTeam team{static_cast<int>(threadIdx.x & 31)};
  const Shape s = solved_shape(d.view, opt);
  solve_one<T>(team, d.view, opt, carve<T>(ws + d.ws_offset, s), out + d.index * stride, totals + d.index,
               status + d.index);
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads) block_kernel(const Desc<T>* __restrict__ descs, Options opt, char* ws,
                                                              int64_t* out, int64_t stride, double* totals,
                                                              Status* status) {
  __shared__ __align__(16) unsigned char scratch[(kBlockThreads / 32) * kSlot];
  const Desc<T> d = descs[blockIdx.x];
  BlockTeam team{static_cast<int>(threadIdx.x), scratch};
  const Shape s = solved_shape(d.view, opt);
  solve_one<T>(team, d.view, opt, carve<T>(ws + d.ws_offset, s), out + d.index * stride, totals + d.index,
               status + d.index);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("assignment (CUDA): ") + what + " failed: " + cudaGetErrorString(err));
}

}  // namespace

template <typename T>
void solve_batch_cuda(const std::vector<ProblemView<T>>& problems, const Options& opt, int64_t* col_for_row,
                      int64_t stride, double* totals, void* stream_ptr) {
  const int64_t B = static_cast<int64_t>(problems.size());
  if (B == 0) return;
  int count = 0;
  const cudaError_t probe = cudaGetDeviceCount(&count);
  if (probe != cudaSuccess || count == 0) {
    throw std::runtime_error(std::string("assignment (CUDA): no usable CUDA device or driver (") +
                             (probe != cudaSuccess ? cudaGetErrorString(probe) : "device count is 0") +
                             "); use the CPU solver");
  }
  for (int64_t b = 0; b < B; ++b) {
    const ProblemView<T>& p = problems[b];
    PF_CHECK(p.n >= 0 && p.m >= 0 && p.n <= stride, "cost[", b, "]: bad shape (", p.n, ", ", p.m, ")");
    PF_CHECK(p.num_matches <= std::min(p.n, p.m), "num_matches[", b, "] must be in [0, min(n, m)] = [0, ",
             std::min(p.n, p.m), "]; got ", p.num_matches);
    PF_CHECK(p.n * p.m == 0 || p.c != nullptr, "cost[", b, "] is a null device pointer");
  }
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  std::vector<Desc<T>> warp_descs, block_descs;
  int64_t ws_bytes = 0;
  for (int64_t b = 0; b < B; ++b) {
    const Shape s = solved_shape(problems[b], opt);
    Desc<T> d{problems[b], ws_bytes, b};
    ws_bytes += (workspace_bytes<T>(s) + 255) / 256 * 256;
    (s.cols <= kWarpMaxCols ? warp_descs : block_descs).push_back(d);
  }
  const int64_t nw = static_cast<int64_t>(warp_descs.size()), nb = static_cast<int64_t>(block_descs.size());
  char* ws = nullptr;
  Desc<T>* d_descs = nullptr;
  Status* d_status = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&ws), std::max<int64_t>(ws_bytes, 256), stream), "workspace alloc");
  check(cudaMallocAsync(reinterpret_cast<void**>(&d_descs), B * sizeof(Desc<T>), stream), "descriptor alloc");
  check(cudaMallocAsync(reinterpret_cast<void**>(&d_status), B * sizeof(Status), stream), "status alloc");
  std::vector<Desc<T>> all(warp_descs);
  all.insert(all.end(), block_descs.begin(), block_descs.end());
  check(cudaMemcpyAsync(d_descs, all.data(), B * sizeof(Desc<T>), cudaMemcpyHostToDevice, stream), "descriptor copy");
  if (nw > 0) {
    const int64_t blocks = (nw + kWarpsPerBlock - 1) / kWarpsPerBlock;
    warp_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
        d_descs, nw, opt, ws, col_for_row, stride, totals, d_status);
    check(cudaGetLastError(), "warp kernel launch");
  }
  if (nb > 0) {
    block_kernel<T><<<static_cast<unsigned>(nb), kBlockThreads, 0, stream>>>(d_descs + nw, opt, ws, col_for_row,
                                                                             stride, totals, d_status);
    check(cudaGetLastError(), "block kernel launch");
  }
  std::vector<Status> status(static_cast<size_t>(B));
  check(cudaMemcpyAsync(status.data(), d_status, B * sizeof(Status), cudaMemcpyDeviceToHost, stream), "status copy");
  const cudaError_t done = cudaStreamSynchronize(stream);
  cudaFreeAsync(ws, stream);
  cudaFreeAsync(d_descs, stream);
  cudaFreeAsync(d_status, stream);
  check(done, "kernel execution");
  for (int64_t b = 0; b < B; ++b) {
    if (status[b].code != kOk) {
      throw std::invalid_argument(status_message(status[b], B == 1 ? "cost" : "cost[" + std::to_string(b) + "]",
                                                 problems[b].m, opt.maximize, problems[b].num_matches));
    }
  }
}

template void solve_batch_cuda<float>(const std::vector<ProblemView<float>>&, const Options&, int64_t*, int64_t,
                                      double*, void*);
template void solve_batch_cuda<double>(const std::vector<ProblemView<double>>&, const Options&, int64_t*, int64_t,
                                       double*, void*);

}  // namespace lsap_batch
}  // namespace pyfusion
