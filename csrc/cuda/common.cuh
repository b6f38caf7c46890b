// Shared CUDA helpers: 16-byte packs, float conversion, deterministic block reductions, grid size.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace craft::cuda {

constexpr int kThreads = 256;

// N elements loaded or stored together: one 16-byte vector access for N = 16 / sizeof(T), two for a
// 32-byte pack (8 floats beside 8 bfloat16). Needs a 16-byte aligned address (or sizeof(T) * N when
// smaller, as for N = 1, the scalar fallback).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

// How two buffers of n elements are walked with 16-byte packs of V = 16 / sizeof(T) elements: `head`
// scalar elements until both addresses are 16-byte aligned, then `packs` whole packs, then a scalar
// tail. A view at an offset (buf[1:]) keeps the vector path when both buffers share the offset; buffers
// misaligned differently get packs = 0 (all scalar).
struct PackSplit {
  int64_t head = 0, packs = 0;
  // the elements left to the scalar loop, and the index of the j-th of them
  __host__ __device__ int64_t scalars(int64_t n, int v) const { return n - packs * v; }
  __host__ __device__ int64_t scalar_index(int64_t j, int v) const { return j < head ? j : j + packs * v; }
};

template <typename T>
inline PackSplit split_for_packs(const void* a, const void* b, int64_t n) {
  constexpr int64_t V = 16 / sizeof(T);
  const auto ma = reinterpret_cast<uintptr_t>(a) % 16, mb = reinterpret_cast<uintptr_t>(b) % 16;
  PackSplit s;
  if (ma != mb || ma % sizeof(T) != 0) return s;
  s.head = static_cast<int64_t>((16 - ma) % 16 / sizeof(T));
  if (s.head > n) s.head = n;
  s.packs = (n - s.head) / V;
  return s;
}

// Sum over a block in a fixed order (warp shuffles, then warp 0): same inputs, same bits.
template <int NV>
__device__ __forceinline__ void block_sum(double (&v)[NV]) {
  __shared__ double smem[NV][kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    for (int off = 16; off > 0; off /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
    if (lane == 0) smem[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      v[k] = lane < kThreads / 32 ? smem[k][lane] : 0.0;
      for (int off = 16; off > 0; off /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
    }
  }
  __syncthreads();  // smem may be reused by a following call
}

// The device's multiprocessor count, read once per process for every device (a device attribute query
// costs a driver call: not something to repeat on every launch).
inline int multiprocessors(int device) {
  static const std::vector<int> counts = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaGetDeviceCount(&n));
    std::vector<int> sms(n);
    for (int d = 0; d < n; ++d) C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms[d], cudaDevAttrMultiProcessorCount, d));
    return sms;
  }();
  TORCH_CHECK(device >= 0 && device < static_cast<int>(counts.size()), "craft: no CUDA device ", device);
  return counts[device];
}

// Enough blocks to fill the device (a fixed number per SM), fewer for small problems. Depends only on
// the device and the problem size, so reductions over the same input are reproducible.
inline int device_blocks(int device, int blocks_per_sm = 8) { return multiprocessors(device) * blocks_per_sm; }

inline int grid_for(int64_t work_items, int device) {
  const int64_t needed = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = device_blocks(device);
  return static_cast<int>(needed < 1 ? 1 : (needed < cap ? needed : cap));
}

}  // namespace craft::cuda
