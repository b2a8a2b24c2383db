// CUDA implementation of retro_kernels::cca_decode: maps torch tensors onto the plain CUDA
// launcher in csrc/cuda/cca_decode.cu and runs it on the current stream. Every argument is
// checked first (csrc/torch/arg_checks.h, shared with the CPU op), as are the kernel's limits
// (head_dim, the grid).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda/cca_decode.h"
#include "../torch/arg_checks.h"

namespace retro_kernels {
namespace {

using at::Tensor;

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "cca_decode (CUDA): unsupported dtype ", t);
  }
}

Tensor cca_decode_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                       const std::optional<Tensor>& mask, double scale) {
  const checks::ArgChecker c("cca_decode", q, checks::kDecodeQ, 3, c10::DeviceType::CUDA,
                             {at::kFloat, at::kHalf, at::kBFloat16});
  checks::check_cca_decode(c, q, k, v, mask, scale);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), keys = k.size(1) * k.size(2);
  c.at_least("head_dim (q's last size)", D, 1);
  c.at_most("head_dim (q's last size)", D, cuda::kMaxHeadDim, "the largest head_dim of the CUDA kernel");
  // One block row per (sequence, head): gridDim.y = batch * heads.
  c.at_most("batch * heads (from q)", B * H, 65535, "CUDA's limit on gridDim.y");
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty_like(q);
  if (B * H == 0) return out;  // nothing to launch (and no splits to divide among)

  cuda::DecodeArgs a;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  a.out = out.data_ptr();
  a.batch = B;
  a.heads = H;
  a.head_dim = D;
  a.keys = keys;
  a.q_sb = H * D;
  a.q_sh = D;
  a.k_sb = keys * H * D;
  a.k_sk = H * D;
  a.k_sh = D;
  a.mask_sb = keys;
  a.out_sb = H * D;
  a.out_sh = D;
  a.scale = static_cast<float>(scale);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  a.splits = cuda::decode_num_splits(B, H, keys, sms);
  Tensor workspace;
  const size_t ws = cuda::decode_workspace_floats(B, H, D, a.splits);
  if (ws > 0) {
    workspace = at::empty({static_cast<int64_t>(ws)}, q.options().dtype(at::kFloat));
    a.workspace = workspace.data_ptr<float>();
  }
  C10_CUDA_CHECK(cuda::launch_cca_decode(a, to_dtype(q.scalar_type()),
                                         at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(retro_kernels, CUDA, m) { m.impl("cca_decode", &cca_decode_cuda); }

}  // namespace retro_kernels
