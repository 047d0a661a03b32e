// Tests only: llip_kernels.cu compiled for host threads (emu/cuda_host_emu.h), with a C interface for ctypes.
// Built and driven by tests/kernels/test_cuda_host_emulation.py; never part of the extension.
#define LLIP_HOST_EMULATION 1
#include "../llip_kernels.cu"

extern "C" {

size_t emu_smem_bytes(const LlipDims* dims, int backward) { return llip_cuda_smem_bytes(*dims, backward); }

int emu_pick_bt(const LlipDims* dims, int backward, size_t max_smem) {
  return llip_cuda_pick_bt(*dims, backward, max_smem);
}

const char* emu_cosine(int dtype, const LlipInputsPtr* in, const LlipDims* dims, float* out) {
  return llip_cuda_cosine(LlipDtype(dtype), *in, *dims, out, nullptr);
}

const char* emu_sigmoid_fwd(int dtype, const LlipInputsPtr* in, const LlipDims* dims, int pos_offset, int has_pos,
                            float* out, int grid_x) {
  return llip_cuda_sigmoid_fwd(LlipDtype(dtype), *in, *dims, pos_offset, has_pos, out, grid_x, nullptr);
}

const char* emu_sigmoid_bwd(int dtype, const LlipInputsPtr* in, const LlipDims* dims, int pos_offset, int has_pos,
                            const float* gout, const LlipGradsPtr* grads, int deterministic) {
  return llip_cuda_sigmoid_bwd(LlipDtype(dtype), *in, *dims, pos_offset, has_pos, gout, *grads, deterministic,
                               nullptr);
}
}
