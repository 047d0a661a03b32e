// Torch binding of the Llip CUDA kernels: checks tensors, then calls the launchers of llip_kernels.cu.
// Built by llip_kernels/backends/cuda.py (torch.utils.cpp_extension.load); the torch.library custom ops that wrap
// these functions (with fake implementations and autograd) are defined in Python there.
// c10 headers only: ATen/cuda/CUDAContext.h would pull in cuBLAS / cuSPARSE headers that a bare toolkit may lack.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>
#include <tuple>

#include "llip_cuda.h"

namespace {

void check_tensor(const at::Tensor& x, const char* name, const at::Tensor& like, at::IntArrayRef shape) {
  TORCH_CHECK(x.is_cuda(), "llip cuda: ", name, " must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.device() == like.device(), "llip cuda: ", name, " is on ", x.device(), " but k is on ", like.device());
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "llip cuda: ", name, " has dtype ", x.scalar_type(),
              " but k has ", like.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "llip cuda: ", name, " must be contiguous");
  TORCH_CHECK(x.sizes() == shape, "llip cuda: ", name, " must have shape ", shape, ", got ", x.sizes());
  // wmma fragments are loaded straight from g in global memory: 32-byte alignment is required there.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 32 == 0, "llip cuda: ", name, " must be 32-byte aligned");
}

void check_f32(const at::Tensor& x, const char* name, const at::Tensor& like, at::IntArrayRef shape) {
  TORCH_CHECK(x.device() == like.device(), "llip cuda: ", name, " is on ", x.device(), " but k is on ", like.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "llip cuda: ", name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous() && x.sizes() == shape, "llip cuda: ", name,
              " must be a contiguous float32 tensor of shape ", shape, ", got ", x.sizes());
}

struct Call {
  LlipDtype dtype;
  LlipInputsPtr in;
  LlipDims dims;
};

// k, v: [Bi, H, K, d]; q, u: [Bt, H, d] (u = W_out @ normalize(y), in k's dtype); g: [Bi, H*Kp, H*Kp] scaled Gram
// matrices (Kp = K rounded up to 16) in k's dtype; gscale: [Bi] float32; t, b: float32 scalars.
Call prepare(const at::Tensor& k, const at::Tensor& v, const at::Tensor& q, const at::Tensor& u, const at::Tensor& g,
             const at::Tensor& gscale, const at::Tensor& t, const at::Tensor& b, double tau) {
  TORCH_CHECK(k.is_cuda(), "llip cuda: k must be a CUDA tensor, got device ", k.device());
  TORCH_CHECK(k.dim() == 4, "llip cuda: k must be [Bi, H, K, d], got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 || k.scalar_type() == at::kHalf,
              "llip cuda: the tensor-core kernels take bfloat16 or float16 inputs, got ", k.scalar_type());
  TORCH_CHECK(q.dim() == 3, "llip cuda: q must be [Bt, H, d], got ", q.sizes());
  const int64_t Bi = k.size(0), H = k.size(1), K = k.size(2), d = k.size(3), Bt = q.size(0);
  const int64_t HKp = H * ((K + 15) / 16 * 16);
  check_tensor(k, "k", k, {Bi, H, K, d});
  check_tensor(v, "v", k, {Bi, H, K, d});
  check_tensor(q, "q", k, {Bt, H, d});
  check_tensor(u, "u", k, {Bt, H, d});
  check_tensor(g, "g", k, {Bi, HKp, HKp});
  check_f32(gscale, "gscale", k, {Bi});
  check_f32(t, "t", k, {});
  check_f32(b, "b", k, {});
  TORCH_CHECK(Bi <= 65535 && Bt < (int64_t(1) << 31) / (H * d), "llip cuda: batch too large for one call");
  Call c;
  c.dtype = k.scalar_type() == at::kBFloat16 ? LLIP_BF16 : LLIP_F16;
  c.in = {k.data_ptr(), v.data_ptr(), q.data_ptr(), u.data_ptr(), g.data_ptr(),
          gscale.data_ptr<float>(), t.data_ptr<float>(), b.data_ptr<float>()};
  c.dims = LlipDims{int(Bi), int(Bt), int(H), int(K), int(d), 0, 0, 0, 0, float(tau)};
  return c;
}

void raise_if(const char* err) { TORCH_CHECK(err == nullptr, err ? err : ""); }

at::Tensor zeros_f32(const at::Tensor& like, at::IntArrayRef shape) {
  return at::zeros(shape, like.options().dtype(at::kFloat));
}

// cos(z[i, j], y_j) -> [Bi, Bt] float32.
at::Tensor cosine(const at::Tensor& k, const at::Tensor& v, const at::Tensor& q, const at::Tensor& u,
                  const at::Tensor& g, const at::Tensor& gscale, double tau) {
  const at::Tensor one = at::ones({}, k.options().dtype(at::kFloat));
  Call c = prepare(k, v, q, u, g, gscale, one, one, tau);
  const c10::cuda::CUDAGuard guard(k.device());
  at::Tensor out = at::empty({k.size(0), q.size(0)}, k.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  raise_if(llip_cuda_cosine(c.dtype, c.in, c.dims, out.data_ptr<float>(), stream));
  return out;
}

// Per-block partial sums of -log sigmoid(l * logit) -> [Bi, grid_x] float32 (sum it, then divide by Bi).
at::Tensor sigmoid_fwd(const at::Tensor& k, const at::Tensor& v, const at::Tensor& q, const at::Tensor& u,
                       const at::Tensor& g, const at::Tensor& gscale, const at::Tensor& t, const at::Tensor& b,
                       double tau, int64_t pos_offset, bool has_pos, int64_t grid_x) {
  Call c = prepare(k, v, q, u, g, gscale, t, b, tau);
  TORCH_CHECK(grid_x >= 1 && grid_x <= 1024, "llip cuda: grid_x must be in [1, 1024]");
  const c10::cuda::CUDAGuard guard(k.device());
  at::Tensor out = zeros_f32(k, {k.size(0), grid_x});
  raise_if(llip_cuda_sigmoid_fwd(c.dtype, c.in, c.dims, int(pos_offset), has_pos ? 1 : 0, out.data_ptr<float>(),
                                 int(grid_x), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

// Gradients of sum_ij -log sigmoid(l * logit) scaled by gout (float32 scalar):
// (dk, dv [Bi, H, K, d], dq, du [Bt, H, d], dg [Bi, HKp, HKp] w.r.t. the unscaled Gram matrix, dt_part, db_part [Bi]),
// all float32. deterministic: dq and du without atomics (bitwise repeatable, about twice the work).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_bwd(
    const at::Tensor& gout, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q, const at::Tensor& u,
    const at::Tensor& g, const at::Tensor& gscale, const at::Tensor& t, const at::Tensor& b, double tau,
    int64_t pos_offset, bool has_pos, bool deterministic) {
  Call c = prepare(k, v, q, u, g, gscale, t, b, tau);
  check_f32(gout, "gout", k, {});
  const c10::cuda::CUDAGuard guard(k.device());
  // float64 accumulators (the kernels sum each tile's float32 products into them), returned in float32
  auto zeros_f64 = [&](at::IntArrayRef shape) { return at::zeros(shape, k.options().dtype(at::kDouble)); };
  at::Tensor dk = zeros_f64(k.sizes()), dv = zeros_f64(k.sizes());
  at::Tensor dq = zeros_f64(q.sizes()), du = zeros_f64(q.sizes());
  at::Tensor dg = zeros_f64(g.sizes());
  at::Tensor dt_part = zeros_f64({k.size(0)}), db_part = zeros_f64({k.size(0)});
  LlipGradsPtr grads{dk.data_ptr<double>(), dv.data_ptr<double>(), dq.data_ptr<double>(), du.data_ptr<double>(),
                     dg.data_ptr<double>(), dt_part.data_ptr<double>(), db_part.data_ptr<double>()};
  raise_if(llip_cuda_sigmoid_bwd(c.dtype, c.in, c.dims, int(pos_offset), has_pos ? 1 : 0, gout.data_ptr<float>(),
                                 grads, deterministic ? 1 : 0, c10::cuda::getCurrentCUDAStream().stream()));
  auto f32 = [](const at::Tensor& x) { return x.to(at::kFloat); };
  return {f32(dk), f32(dv), f32(dq), f32(du), f32(dg), f32(dt_part), f32(db_part)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "Llip CUDA kernels (form 3, wmma bf16/fp16); see llip_kernels/backends/cuda.py";
  m.def("cosine", &cosine, "all-pairs cos(z_ij, y_j) -> [Bi, Bt] float32", py::arg("k"), py::arg("v"), py::arg("q"),
        py::arg("u"), py::arg("g"), py::arg("gscale"), py::arg("tau"));
  m.def("sigmoid_fwd", &sigmoid_fwd, "SigLIP loss partial sums -> [Bi, grid_x] float32", py::arg("k"), py::arg("v"),
        py::arg("q"), py::arg("u"), py::arg("g"), py::arg("gscale"), py::arg("t"), py::arg("b"), py::arg("tau"),
        py::arg("pos_offset"), py::arg("has_pos"), py::arg("grid_x"));
  m.def("sigmoid_bwd", &sigmoid_bwd, "SigLIP loss gradients (float32)", py::arg("gout"), py::arg("k"), py::arg("v"),
        py::arg("q"), py::arg("u"), py::arg("g"), py::arg("gscale"), py::arg("t"), py::arg("b"), py::arg("tau"),
        py::arg("pos_offset"), py::arg("has_pos"), py::arg("deterministic"));
}
