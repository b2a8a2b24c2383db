// The op schemas of retro_kernels (one TORCH_LIBRARY for the whole package) and the pybind11
// module `retro_kernels._C` that loads them. Kernels register per device in cpu_ops.cpp and
// csrc/torch_cuda/; fake (meta) implementations and autograd live in Python
// (retro_kernels/ops/grouped_attention/registration.py), as in pytorch/extension-cpp.
#include <torch/extension.h>
#include <torch/library.h>

#include "../cpu/grouped_attention.h"

TORCH_LIBRARY(retro_kernels, m) {
  // Fake (meta) implementations and autograd are registered when the package is imported.
  m.impl_abstract_pystub("retro_kernels.ops.grouped_attention.registration");
  // Chunked cross-attention (docs/semantics.md, "Chunked cross-attention"): q (B, N, H, D); k/v (B, L, K, R, H, D);
  // neighbour_mask (B, L, K, R) bool. Returns out (B, N, H, D) and lse (B, H, N).
  m.def("cca_fwd(Tensor q, Tensor k, Tensor v, Tensor? neighbour_mask, int chunk_size, "
        "float softmax_scale) -> (Tensor, Tensor)");
  m.def("cca_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? neighbour_mask, "
        "Tensor out, Tensor lse, int chunk_size, float softmax_scale) -> (Tensor, Tensor, Tensor)");
  // Neighbour self-attention: q/k/v (B, L, K, R, H, D), attention within each neighbour.
  m.def("neighbour_self_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? neighbour_mask, "
        "float softmax_scale) -> (Tensor, Tensor)");
  m.def("neighbour_self_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
        "Tensor? neighbour_mask, Tensor out, Tensor lse, float softmax_scale) "
        "-> (Tensor, Tensor, Tensor)");
  // Neighbour cross-attention: q (B, L, K, R, H, D); k/v (B, L, C, H, D) shared by the K
  // neighbours of a chunk; chunk_mask (B, L, C).
  m.def("neighbour_cross_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? chunk_mask, "
        "float softmax_scale) -> (Tensor, Tensor)");
  m.def("neighbour_cross_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
        "Tensor? chunk_mask, Tensor out, Tensor lse, float softmax_scale) "
        "-> (Tensor, Tensor, Tensor)");
  // One decoding step of CCA: q (B, H, D); k/v (B, K, R, H, D); neighbour_mask (B, K, R).
  m.def("cca_decode(Tensor q, Tensor k, Tensor v, Tensor? neighbour_mask, float softmax_scale) "
        "-> Tensor");
}

namespace retro_kernels {
// setup.py defines RETRO_KERNELS_WITH_CUDA when it compiles csrc/cuda and csrc/torch_cuda in.
bool cuda_kernels_compiled() {
#ifdef RETRO_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace retro_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "retro_kernels compiled ops (registered under torch.ops.retro_kernels)";
  m.def("cuda_kernels_compiled", &retro_kernels::cuda_kernels_compiled,
        "Whether this build contains the CUDA kernels.");
  m.def("cpu_isa", [] { return std::string(retro_kernels::cpu::cpu_isa_name(retro_kernels::cpu::cpu_isa())); },
        "Instruction set the C++ CPU kernels run with: 'avx512', 'avx2' or 'default' (baseline: "
        "SSE2 / NEON). RETRO_KERNELS_CPU_ISA lowers it.");
}
