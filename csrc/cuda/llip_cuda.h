// Host interface of the Llip CUDA kernels (csrc/cuda/llip_kernels.cu). Plain C types only, so that the torch
// binding (llip_binding.cpp, compiled by the host compiler) and the kernels (compiled by nvcc without torch
// headers) share it. Every launcher returns nullptr on success or a static, readable error message.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

// Sizes of one call. Padded sizes are rounded up to the 16 of a wmma m16n16k16 tile.
struct LlipDims {
  int Bi, Bt, H, K, d;  // images, texts, heads, mixture tokens, head dim
  int Kp, dp, HKp;      // K and d padded to 16; HKp = H * Kp (rows of the per-image Gram matrix)
  int BT;               // texts per tile (16, 32 or 64); chosen by the launcher
  float tau;            // mixer temperature
};

// Element type of k, v, q, u, g on the device.
enum LlipDtype { LLIP_F16 = 0, LLIP_BF16 = 1 };

// Device pointers. k, v: [Bi, H, K, d]; q, u: [Bt, H, d]; g: [Bi, HKp, HKp] (Gram matrix divided by gscale);
// gscale: [Bi] float32; t, b: float32 scalars. All contiguous.
struct LlipInputsPtr {
  const void* k;
  const void* v;
  const void* q;
  const void* u;
  const void* g;
  const float* gscale;
  const float* t;
  const float* b;
};

// Bytes of dynamic shared memory one block needs (backward != 0: the loss backward kernel).
size_t llip_cuda_smem_bytes(LlipDims dims, int backward);

// Largest tile width BT in {64, 32, 16} whose shared memory fits `max_smem` bytes, or 0 if none does.
int llip_cuda_pick_bt(LlipDims dims, int backward, size_t max_smem);

// cos(z[i, j], y_j) for every pair -> out: [Bi, Bt] float32.
const char* llip_cuda_cosine(LlipDtype dtype, LlipInputsPtr in, LlipDims dims, float* out, cudaStream_t stream);

// SigLIP loss partial sums: out: [Bi, grid_x] float32 with sum(out) = sum_ij -log sigmoid(l_ij * logit_ij).
// pos_offset / has_pos define the labels (l = +1 iff has_pos and j == i + pos_offset). grid_x <= ceil(Bt / BT).
const char* llip_cuda_sigmoid_fwd(LlipDtype dtype, LlipInputsPtr in, LlipDims dims, int pos_offset, int has_pos,
                                  float* out, int grid_x, cudaStream_t stream);

// Backward of the SigLIP loss. gout: float32 scalar dLoss/d(sum_ij -log sigmoid) (already divided by Bi).
// Outputs, float64 and zero-filled by the caller: each tile's float32 products are summed into them in float64,
// so the error of these long sums (over texts, over images) does not grow with the batch. dk, dv [Bi, H, K, d]
// (written by one block per image),
// dq, du [Bt, H, d] (float atomics; with deterministic != 0, a second launch with one block per text tile writes
// them in a fixed order instead, recomputing the pair work), dg [Bi, HKp, HKp] (gradient w.r.t. the unscaled Gram
// matrix), dt_part, db_part [Bi] (per-image partial sums of dLoss/dt and dLoss/db).
struct LlipGradsPtr {
  double* dk;
  double* dv;
  double* dq;
  double* du;
  double* dg;
  double* dt_part;
  double* db_part;
};
const char* llip_cuda_sigmoid_bwd(LlipDtype dtype, LlipInputsPtr in, LlipDims dims, int pos_offset, int has_pos,
                                  const float* gout, LlipGradsPtr grads, int deterministic, cudaStream_t stream);
