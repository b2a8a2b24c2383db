// CUDA implementation of retro_kernels::block_attention_decode (one query row per key group):
// maps the op's description -- q (B, G, H, D), k/v (B, G, keys, H, D), key_mask (B, G, keys) --
// onto the plain CUDA launcher in csrc/cuda/block_attention_decode.cu, each (batch element, key
// group) one row of the kernel, and runs it on the current stream. Every argument is checked
// first (csrc/torch/arg_checks.h, shared with the CPU op), as are the kernel's limits (head_dim,
// the grid).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda/block_attention_decode.h"
#include "../torch/arg_checks.h"

namespace retro_kernels {
namespace {

using at::Tensor;

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "block_attention_decode (CUDA): unsupported dtype ", t);
  }
}

Tensor block_attention_decode_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const std::optional<Tensor>& key_mask, double scale) {
  const checks::ArgChecker c("block_attention_decode", q, checks::kDecodeQ, 4,
                             c10::DeviceType::CUDA, {at::kFloat, at::kHalf, at::kBFloat16});
  checks::check_decode(c, q, k, v, key_mask, scale);
  // Contiguous (checked): (batch, key group) pairs are the kernel's batch elements.
  const int64_t rows = q.size(0) * q.size(1), H = q.size(2), D = q.size(3), keys = k.size(2);
  c.at_least("head_dim (q's last size)", D, 1);
  c.at_most("head_dim (q's last size)", D, cuda::kMaxHeadDim, "the largest head_dim of the CUDA kernel");
  // One block row per (batch element, key group, head): gridDim.y = batch * key_groups * heads.
  c.at_most("batch * key_groups * heads (from q)", rows * H, 65535, "CUDA's limit on gridDim.y");
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty_like(q);
  if (rows * H == 0) return out;  // nothing to launch (and no splits to divide among)

  cuda::DecodeArgs a;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.mask = key_mask.has_value() ? key_mask->data_ptr<bool>() : nullptr;
  a.out = out.data_ptr();
  a.batch = rows;
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
  a.splits = cuda::decode_num_splits(rows, H, keys, sms);
  Tensor workspace;
  const size_t ws = cuda::decode_workspace_floats(rows, H, D, a.splits);
  if (ws > 0) {
    workspace = at::empty({static_cast<int64_t>(ws)}, q.options().dtype(at::kFloat));
    a.workspace = workspace.data_ptr<float>();
  }
  C10_CUDA_CHECK(cuda::launch_block_attention_decode(a, to_dtype(q.scalar_type()),
                                                     at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(retro_kernels, CUDA, m) {
  m.impl("block_attention_decode", &block_attention_decode_cuda);
}

}  // namespace retro_kernels
