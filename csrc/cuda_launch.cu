// GPU target: one CUDA block of kThreads threads per program of the launch geometry, on the caller's
// stream (so steps are CUDA-graph capturable). Block reductions are a fixed shuffle tree within each
// warp and then across warps: deterministic, no atomics.
#include <cuda_runtime.h>

#include "dispatch.h"

namespace lrfree {

template <typename T, bool IsMax> __device__ __forceinline__ T combine(T a, T b) {
  return IsMax ? (a > b ? a : b) : a + b;
}

template <typename T, bool IsMax> __device__ T block_reduce(T v) {
  __shared__ double per_warp[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) v = combine<T, IsMax>(v, __shfl_down_sync(0xffffffffu, v, offset));
  if (lane == 0) per_warp[warp] = double(v);
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? T(per_warp[lane]) : (IsMax ? T(-INFINITY) : T(0));
    for (int offset = 16; offset > 0; offset /= 2) v = combine<T, IsMax>(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  __syncthreads();  // per_warp may be reused by the next reduction of the same program
  return v;         // valid in thread 0
}

struct CudaCtx {
  int64_t pid;
  int64_t tid;
  int64_t nthreads;
  template <typename T> __device__ T sum(T v) const { return block_reduce<T, false>(v); }
  template <typename T> __device__ T max(T v) const { return block_reduce<T, true>(v); }
  __device__ bool leader() const { return tid == 0; }
};

template <class Body> __global__ void __launch_bounds__(kThreads) program(Body body) {
  CudaCtx ctx{int64_t(blockIdx.x), int64_t(threadIdx.x), int64_t(blockDim.x)};
  body(ctx);
}

static void check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) throw std::runtime_error("lrfree CUDA extension: " + what + ": " + cudaGetErrorString(err));
}

void launch(const std::string& name, int64_t grid, const std::vector<int64_t>& pointers,
            const std::vector<int64_t>& flags, int dtype, int state_dtype, int64_t block, int64_t stream,
            int device) {
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  auto s = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream));
  dispatch(name, grid, pointers, flags, dtype, state_dtype, block, [&](int64_t n, const auto& body) {
    if (n > 0x7fffffff) throw std::invalid_argument("lrfree CUDA extension: grid too large");
    program<<<unsigned(n), kThreads, 0, s>>>(body);
  });
  cudaError_t err = cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
  check(err, "launching " + name);
}

const char* target() { return "cuda"; }

}  // namespace lrfree
