// Host emulation of the CUDA features llip_kernels.cu uses, for testing the kernels' own source on a machine
// without a GPU (tests/kernels/test_cuda_host_emulation.py). Compile the .cu as C++ with -DLLIP_HOST_EMULATION; never
// part of the real extension.
//
// Model: blocks run one after another; the threads of a block are real std::threads meeting at std::barrier for
// __syncthreads() and per-warp barriers for __syncwarp(). A wmma fragment holds the whole 16x16 tile in every lane
// (each lane computes the full product: slow, exact in float32), stores are done by lane 0. Shared memory starts
// filled with 0xFF bytes (NaN in float32, float16 and bfloat16), so reading shared memory that was never written
// poisons the results. Fragment loads and stores check the alignment rules of the real wmma API and abort with a
// message when broken, since on a GPU they would fault or silently misbehave.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __launch_bounds__(...)
#ifndef INFINITY
#define INFINITY (__builtin_inff())
#endif

using std::isfinite;
using std::max;
using std::min;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 gridDim;
inline thread_local dim3 blockDim;

namespace llip_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "llip host emulation: %s (block %u,%u thread %u)\n", what, blockIdx.x, blockIdx.y, threadIdx.x);
  std::abort();
}

struct BlockState {
  int threads = 0;
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  unsigned char* dynamic_smem = nullptr;
  std::mutex static_mutex;
  std::map<int, std::vector<unsigned char>> static_smem;  // by source line of the __shared__ declaration
};

inline BlockState* g_block = nullptr;

inline unsigned char* dynamic_smem() { return g_block->dynamic_smem; }

template <typename T>
T* static_smem(int n, int line) {
  std::lock_guard<std::mutex> lock(g_block->static_mutex);
  auto& buf = g_block->static_smem[line];
  if (buf.empty()) buf.assign(sizeof(T) * n, 0xFF);
  return reinterpret_cast<T*>(buf.data());
}

// Runs kernel<<<grid, block, smem>>>(args...) on host threads.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, int block, size_t smem, A... args) {
  if (block % 32 != 0) fail("block size must be a multiple of 32");
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      BlockState state;
      state.threads = block;
      state.block_barrier = std::make_unique<std::barrier<>>(block);
      for (int w = 0; w < block / 32; ++w) state.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
      const size_t bytes = smem ? smem : 1;
      unsigned char* arena = static_cast<unsigned char*>(std::aligned_alloc(128, (bytes + 127) / 128 * 128));
      std::memset(arena, 0xFF, bytes);
      state.dynamic_smem = arena;
      g_block = &state;
      std::vector<std::thread> threads;
      threads.reserve(block);
      for (int t = 0; t < block; ++t) {
        threads.emplace_back([=] {
          threadIdx = uint3{unsigned(t), 0, 0};
          blockIdx = uint3{bx, by, 0};
          gridDim = grid;
          blockDim = dim3(block);
          kernel(args...);
        });
      }
      for (auto& th : threads) th.join();
      g_block = nullptr;
      std::free(arena);
    }
  }
}

}  // namespace llip_emu

inline void __syncthreads() { llip_emu::g_block->block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { llip_emu::g_block->warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }

// The CUDA runtime calls of the launchers.
inline int g_last_error = 0;
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 227 * 1024 : 0;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int value) {
  return value <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[256];  // the whole 16x16 tile, row-major, in every lane
};

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void check_alignment(const void* p, unsigned ldm, unsigned elem_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) llip_emu::fail("wmma pointer not 32-byte aligned");
  if ((ldm * elem_bytes) % 16 != 0) llip_emu::fail("wmma ldm not a multiple of 16 bytes");
}

template <typename F>
void fill_fragment(F& f, float v) {
  for (float& e : f.x) e = v;
}

template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check_alignment(p, ldm, sizeof(T));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r * 16 + c] = to_float(std::is_same_v<L, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) acc += a.x[r * 16 + k] * b.x[k * 16 + n];
      out[r * 16 + n] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_alignment(p, ldm, sizeof(float));
  if (threadIdx.x % 32 != 0) return;  // lane 0 writes; the kernels __syncwarp() before reading
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * 16 + c];
}

}  // namespace wmma
}  // namespace nvcuda
